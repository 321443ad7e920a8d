//! KV-cache policy settings shared by the commands and the server: quantization (SKVQ values,
//! KIVI keys), Quest page selection and H2O eviction, each off unless asked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arbor_cache::{
    Calibration, H2oConfig, KvCompression, KvLayout, KvPolicy, QuantConfig, QuestConfig,
};

/// What `--kv-bits`, `--kv-calib`, `--quest-budget` and `--h2o-budget` ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvSpec {
    /// Quantization of old pages.
    pub quant: Option<QuantConfig>,
    /// SKVQ calibration file (`arbor calibrate`), for the quantizers.
    pub calibration: Option<PathBuf>,
    /// Quest's token budget per query.
    pub quest_budget: Option<usize>,
    /// H2O's token budget per layer.
    pub h2o_budget: Option<usize>,
}

impl KvSpec {
    /// Whether every part is off (an exact cache).
    pub fn is_off(&self) -> bool {
        self.quant.is_none() && self.quest_budget.is_none() && self.h2o_budget.is_none()
    }

    /// The policy for a model whose paged cache has `layout` (`None` when the backend keeps a
    /// dense device cache); `None` when every part is off.
    ///
    /// # Errors
    /// A policy on a backend without the paged cache, an unreadable or mismatched
    /// calibration, or settings that cannot work (e.g. a budget below the recent span).
    pub fn build(&self, layout: Option<KvLayout>) -> Result<Option<Arc<KvPolicy>>> {
        if self.calibration.is_some() && self.quant.is_none() {
            bail!("--kv-calib needs --kv-bits");
        }
        if self.is_off() {
            return Ok(None);
        }
        let Some(layout) = layout else {
            bail!("KV-cache compression needs a paged cache (the CPU or CUDA backend)");
        };
        let calibration = self
            .calibration
            .as_deref()
            .map(load_calibration)
            .transpose()?;
        self.policy(&layout, calibration.as_ref()).map(Some)
    }

    /// The policy for `layout` with its quantizers calibrated by `calibration` where given
    /// (the file `self.calibration` names is not read here: see [`KvSpec::build`]).
    ///
    /// # Errors
    /// A calibration of another shape, or settings that cannot work.
    pub fn policy(
        &self,
        layout: &KvLayout,
        calibration: Option<&Calibration>,
    ) -> Result<Arc<KvPolicy>> {
        let compression = self
            .quant
            .map(|q| KvCompression::new(layout, &q, calibration))
            .transpose()?;
        let policy = KvPolicy {
            compression,
            quest: self.quest_budget.map(QuestConfig::with_budget),
            h2o: self.h2o_budget.map(H2oConfig::with_budget),
        };
        policy.check(layout)?;
        Ok(Arc::new(policy))
    }
}

/// Reads a calibration written by `arbor calibrate`.
///
/// # Errors
/// Unreadable file or JSON that is not a calibration.
pub fn load_calibration(path: &Path) -> Result<Calibration> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a KV calibration", path.display()))
}
