//! One policy composing the compression methods; every part can be off.

use crate::{CacheError, H2oConfig, KvCompression, KvLayout, QuestConfig};

/// How a paged cache compresses: SKVQ quantization, Quest page selection, H2O eviction, any
/// combination (all off: an exact cache).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvPolicy {
    /// Quantization of old pages.
    pub compression: Option<KvCompression>,
    /// Query-aware page selection.
    pub quest: Option<QuestConfig>,
    /// Heavy-hitter eviction.
    pub h2o: Option<H2oConfig>,
}

impl KvPolicy {
    /// Only quantization.
    pub fn quantized(compression: KvCompression) -> Self {
        Self {
            compression: Some(compression),
            ..Self::default()
        }
    }

    /// Checks the parts fit `layout` and each other.
    ///
    /// # Errors
    /// [`CacheError::Policy`] naming the setting that cannot work.
    pub fn check(&self, layout: &KvLayout) -> Result<(), CacheError> {
        let bad = |m: String| Err(CacheError::Policy(m));
        if layout.page_size == 0 {
            return bad("page size 0".into());
        }
        if let Some(c) = &self.compression
            && !c.fits(layout)
        {
            return bad("quantizers built for another model or page size".into());
        }
        if let Some(q) = &self.quest
            && q.budget < q.recent + q.sinks + 2 * layout.page_size
        {
            return bad(format!(
                "Quest budget {} is below its recent tokens + sinks + two pages ({})",
                q.budget,
                q.recent + q.sinks + 2 * layout.page_size
            ));
        }
        if let Some(h) = &self.h2o
            && h.budget < h.recent + h.sinks + layout.page_size
        {
            return bad(format!(
                "H2O budget {} is below its recent tokens + sinks + one page ({})",
                h.budget,
                h.recent + h.sinks + layout.page_size
            ));
        }
        Ok(())
    }

    /// The deepest speculation tree under which speculative decoding stays equal to plain
    /// decoding at the sequence length `len` (`None`: unlimited): Quest's recent span, the
    /// quantization window, and with H2O the distance to the next eviction point.
    pub fn max_tree_depth(&self, len: usize, page_size: usize) -> Option<usize> {
        let mut cap: Option<usize> = None;
        let mut limit = |d: usize| cap = Some(cap.map_or(d, |c| c.min(d)));
        if let Some(c) = &self.compression {
            limit(c.window);
        }
        if let Some(q) = &self.quest {
            limit(q.recent);
        }
        if self.h2o.is_some() {
            let next = (len / page_size + 1) * page_size;
            limit(next - len - 1);
        }
        cap
    }
}
