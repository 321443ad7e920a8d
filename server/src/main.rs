//! `arbor`: tree-speculative LLM serving. Subcommands: `fetch`, `serve`, `generate`, `bench`,
//! `kv-eval`, `calibrate`.

mod bench;
mod calibrate;
mod cli;
mod generate;
mod kv_eval;
mod serve;

use clap::Parser;

/// mimalloc keeps freed pages for reuse: a forward allocates and frees buffers of a few MB
/// (logits, activations of the output head), which glibc's allocator returned to the kernel
/// and took back as freshly zeroed pages every forward (~6% of a tree verification in page
/// clearing).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_level())),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
