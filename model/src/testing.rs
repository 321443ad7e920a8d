//! Helpers for tests and examples on tiny random-weight models.

use serde_json::json;

use crate::Tokenizer;

/// GPT-2's byte → printable-char mapping used by byte-level BPE vocabularies.
pub fn byte_to_char(b: u8) -> char {
    let printable = |x: u8| (33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid scalar")
}

/// A byte-level tokenizer with no merges: ids 0..256 are the bytes, 256 is `<|endoftext|>`
/// (EOS). Vocabulary size 257; a ChatML-style chat template.
pub fn byte_tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_to_char(b).to_string(), json!(b));
    }
    vocab.insert("<|endoftext|>".into(), json!(256));
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
                    {% if add_generation_prompt %}<assistant>{% endif %}";
    Tokenizer::from_json(
        &tj.to_string(),
        None,
        false,
        vec![256],
        Some(template.into()),
    )
    .expect("static tokenizer is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_any_text() {
        let t = byte_tokenizer();
        let text = "héllo, wörld\n\t  🌳 <|endoftext|>";
        let ids = t.encode(text).unwrap();
        assert_eq!(*ids.last().unwrap(), 256);
        assert_eq!(ids.len(), text.len() - "<|endoftext|>".len() + 1);
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert!(t.is_end_of_generation(256));
    }
}
