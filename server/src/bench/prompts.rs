//! Benchmark prompt files: JSON lines (optionally gzip-compressed).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use arbor_engine::Prompt;
use arbor_model::ChatMessage;
use serde::Deserialize;

/// One benchmark prompt.
#[derive(Debug, Clone)]
pub struct BenchPrompt {
    /// Name in reports (`id`, `task_id`, or the line number).
    pub id: String,
    /// What to continue.
    pub prompt: Prompt,
}

#[derive(Deserialize)]
struct Line {
    id: Option<String>,
    task_id: Option<String>,
    prompt: Option<String>,
    turns: Option<Vec<String>>,
    messages: Option<Vec<ChatMessage>>,
}

/// Reads `path` (`.jsonl` or `.jsonl.gz`): one object per line with `prompt`, `messages` or
/// `turns` (the first turn becomes a user message); blank lines are skipped.
///
/// # Errors
/// Unreadable files, malformed lines (with their line number), files without prompts.
pub fn load(path: &Path) -> Result<Vec<BenchPrompt>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("{}: reading line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line).with_context(|| {
            format!("{}: line {} is not a prompt object", path.display(), i + 1)
        })?;
        let prompt = match (l.prompt, l.messages, l.turns) {
            (Some(p), None, None) => Prompt::Text(p),
            (None, Some(m), None) if !m.is_empty() => Prompt::Chat(m),
            (None, None, Some(t)) if !t.is_empty() => {
                Prompt::Chat(vec![ChatMessage::new("user", t[0].clone())])
            }
            _ => bail!(
                "{}: line {} needs exactly one of a `prompt` string, non-empty `messages` or \
                 non-empty `turns`",
                path.display(),
                i + 1
            ),
        };
        out.push(BenchPrompt {
            id: l
                .id
                .or(l.task_id)
                .unwrap_or_else(|| format!("line {}", i + 1)),
            prompt,
        });
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_all_three_forms_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let text = concat!(
            r#"{"task_id": "t/0", "prompt": "def f():"}"#,
            "\n\n",
            r#"{"turns": ["hi", "again"]}"#,
            "\n",
            r#"{"id": "c", "messages": [{"role": "user", "content": "yo"}]}"#,
            "\n"
        );
        let plain = dir.path().join("p.jsonl");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("p.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        for p in [plain, gz] {
            let v = load(&p).unwrap();
            assert_eq!(v.len(), 3);
            assert_eq!(v[0].id, "t/0");
            assert_eq!(v[1].id, "line 3");
            assert!(matches!(&v[2].prompt, Prompt::Chat(m) if m[0].content == "yo"));
        }
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": 3}\n").unwrap();
        let e = load(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        std::fs::write(&bad, "{\"other\": 1}\n").unwrap();
        assert!(load(&bad).is_err());
    }
}
