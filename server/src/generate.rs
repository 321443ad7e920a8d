//! `arbor generate`: stream a completion to stdout, then timings to stderr.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use arbor_engine::{EngineError, Event, GenerateParams, Generator, Prompt, TreePolicy};
use arbor_model::{ChatMessage, LoadedModel};

use crate::cli::{GenerateArgs, with_backend};
use arbor_server::drafts::{DraftSpec, build_engine, load_drafts};

pub fn run(args: &GenerateArgs) -> Result<()> {
    let text = if args.prompt == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading the prompt from stdin")?;
        String::from_utf8(bytes).context("the prompt on stdin is not valid UTF-8")?
    } else {
        args.prompt.clone()
    };
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s.clone()));
        }
        messages.push(ChatMessage::new("user", text));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(text)
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..GenerateParams::default()
    };
    let drafts = DraftSpec::parse_all(&args.drafts)?;
    let policy: TreePolicy = args.tree.parse()?;
    with_backend!(args.model.device, |B, device| {
        let loaded =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let mut out = std::io::stdout().lock();
        let kv = args
            .kv
            .spec()
            .build(loaded.model.kv_layout(arbor_model::KV_PAGE_SIZE))?;
        if drafts.is_empty() {
            let mut generator = Generator::new(&loaded.model, &loaded.tokenizer);
            if let Some(kv) = kv {
                generator = generator.with_kv_policy(kv)?;
            }
            stream(generator.generate(&prompt, &params)?, &mut out)
        } else {
            let drafts = load_drafts(&loaded, &drafts, args.model.resolve_options(), &device)?;
            let mut engine = build_engine(&loaded, &drafts, policy)?;
            if let Some(kv) = kv {
                engine = engine.with_kv_policy(kv)?;
            }
            stream(engine.generate(&prompt, &params)?, &mut out)
        }
    })
}

/// Prints text as it comes, then timings (and speculation figures) on stderr.
fn stream(
    events: impl Iterator<Item = Result<Event, EngineError>>,
    out: &mut impl Write,
) -> Result<()> {
    for event in events {
        match event? {
            Event::Text(t) => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
            }
            Event::Step(_) => {}
            Event::Done(done) => {
                writeln!(out)?;
                let s = &done.stats;
                eprintln!(
                    "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?}",
                    s.prompt_tokens,
                    s.prefill_tokens_per_sec(),
                    s.generated_tokens,
                    s.decode_tokens_per_sec(),
                    done.reason,
                );
                if let Some(spec) = &done.spec {
                    eprintln!(
                        "speculation: {} steps, tau {:.2} tokens/step, alpha {:.2} ({} of {} drafted)",
                        spec.steps,
                        spec.tau(),
                        spec.alpha(),
                        spec.accepted,
                        spec.drafted
                    );
                }
            }
        }
    }
    Ok(())
}
