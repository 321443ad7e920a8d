//! Stop strings over streamed text: holds back only what might still become a stop string.

/// Tracks generated text against stop strings.
///
/// ```
/// use arbor_engine::StopMatcher;
/// let mut m = StopMatcher::new(vec!["\n\n".into()]);
/// assert_eq!(m.push("Hello\n"), (String::from("Hello"), false)); // "\n" held back
/// assert_eq!(m.push("\nmore"), (String::new(), true));          // stop found
/// ```
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (none: everything passes through).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string was reached
    /// (text from the stop string on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text still held back (emitted when generation ends for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k)
                && stop.is_char_boundary(k)
                && text.ends_with(&stop[..k])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_tokens_is_caught_and_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into(), "é!".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for t in ["ab", "cE", "N", "xyz", "E", "ND", "tail"] {
            let (o, s) = m.push(t);
            out.push_str(&o);
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "abcENxyz");
    }

    #[test]
    fn held_text_is_flushed_and_multibyte_is_safe() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café"), ("caf".to_string(), false));
        assert_eq!(m.flush(), "é");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("x"), ("x".to_string(), false));
    }
}
