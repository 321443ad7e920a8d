//! End-to-end tests across Arbor's crates (in `tests/tests/`), and the helpers they share.
//!
//! Tests that need the real SmolLM2-135M model fetch it on first use (see
//! [`smollm2_path`]); goldens from llama.cpp are checked in under `tests/goldens/` and written
//! by `scripts/make-goldens.py`.

pub mod fixtures;
pub mod parity;

use std::path::{Path, PathBuf};

use arbor_model::hub::{ModelFiles, ResolveOptions, resolve};

/// The crate's folder (where `goldens/` and `fixtures/` live).
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a registry model, fetched if missing (tests share one fetch through a file lock).
///
/// # Panics
/// If the model cannot be fetched: the test cannot run without it.
pub fn registry_model_path(name: &str) -> PathBuf {
    match resolve(
        name,
        ResolveOptions {
            fetch_missing: true,
            progress: false,
            ..ResolveOptions::default()
        },
    ) {
        Ok(ModelFiles::Gguf(p)) => p,
        other => panic!("cannot get {name}: {other:?}"),
    }
}

/// SmolLM2-135M-Instruct Q4_1, fetched if missing.
pub fn smollm2_path() -> PathBuf {
    registry_model_path("smollm2-135m")
}

/// Reads a checked-in golden JSON file.
///
/// # Panics
/// If it is missing or malformed (regenerate with `scripts/make-goldens.py`).
pub fn golden(name: &str) -> serde_json::Value {
    let p = crate_dir().join("goldens").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
