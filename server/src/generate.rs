//! `arbor generate`: stream a completion to stdout, then timings to stderr.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use arbor_engine::{Event, GenerateParams, Generator, Prompt};
use arbor_model::{ChatMessage, LoadedModel};

use crate::cli::{GenerateArgs, with_backend};

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
    with_backend!(args.model.device, |B, device| {
        let loaded =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let generator = Generator::new(&loaded.model, &loaded.tokenizer);
        let mut out = std::io::stdout().lock();
        for event in generator.generate(&prompt, &params)? {
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
                }
            }
        }
        Ok(())
    })
}
