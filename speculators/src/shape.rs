//! Tree shapes: SpecInfer's static expansion and budgeted dynamic (best-first) expansion.

use std::fmt;
use std::str::FromStr;

/// How a draft grows its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeShape {
    /// SpecInfer expansion ⟨k₁..kₘ⟩: every node at level `l-1` gets `k[l-1]` children.
    /// `[1, 1, 1, 1]` is a plain chain of 4.
    Expand(Vec<usize>),
    /// Best-first (EAGLE-2 / Sequoia style): at each of `depth` levels expand the `width` nodes
    /// of the newest level with the highest draft path probability, `width` children each; then
    /// keep the `budget` best nodes (root included).
    Dynamic {
        /// Levels below the root.
        depth: usize,
        /// Nodes expanded per level and children per expanded node.
        width: usize,
        /// Most nodes kept, root included.
        budget: usize,
    },
}

impl TreeShape {
    /// Levels below the root.
    pub fn depth(&self) -> usize {
        match self {
            Self::Expand(k) => k.len(),
            Self::Dynamic { depth, .. } => *depth,
        }
    }

    /// Children per expanded node at the widest level (0 for an empty shape).
    pub fn width(&self) -> usize {
        match self {
            Self::Expand(k) => k.iter().copied().max().unwrap_or(0),
            Self::Dynamic { width, .. } => *width,
        }
    }

    /// Most nodes a tree of this shape can have, root included.
    pub fn max_nodes(&self) -> usize {
        match self {
            Self::Expand(k) => {
                let mut level = 1usize;
                let mut total = 1usize;
                for &x in k {
                    level = level.saturating_mul(x);
                    total = total.saturating_add(level);
                }
                total
            }
            Self::Dynamic { budget, .. } => *budget,
        }
    }
}

/// Errors parsing a [`TreeShape`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad tree shape {0:?}: expected k1,k2,.. (e.g. 2,2,1), chain:N, or dyn:DEPTH,WIDTH,BUDGET \
     (e.g. dyn:6,4,32), all numbers >= 1, at most 256 nodes"
)]
pub struct ShapeParseError(pub String);

impl FromStr for TreeShape {
    type Err = ShapeParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ShapeParseError(s.to_string());
        let nums = |body: &str| -> Result<Vec<usize>, ShapeParseError> {
            body.split(',')
                .map(|x| match x.trim().parse::<usize>() {
                    Ok(v) if v >= 1 => Ok(v),
                    _ => Err(err()),
                })
                .collect()
        };
        let shape = if let Some(n) = s.strip_prefix("chain:") {
            let n = nums(n)?;
            let [n] = n[..] else { return Err(err()) };
            Self::Expand(vec![1; n])
        } else if let Some(body) = s.strip_prefix("dyn:") {
            let [depth, width, budget] = nums(body)?[..] else {
                return Err(err());
            };
            Self::Dynamic {
                depth,
                width,
                budget,
            }
        } else {
            Self::Expand(nums(s)?)
        };
        if shape.max_nodes() > 256 || shape.depth() > 64 {
            return Err(err());
        }
        Ok(shape)
    }
}

impl fmt::Display for TreeShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expand(k) => {
                let parts: Vec<String> = k.iter().map(ToString::to_string).collect();
                write!(f, "{}", parts.join(","))
            }
            Self::Dynamic {
                depth,
                width,
                budget,
            } => write!(f, "dyn:{depth},{width},{budget}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("2,2,1".parse(), Ok(TreeShape::Expand(vec![2, 2, 1])));
        assert_eq!("chain:3".parse(), Ok(TreeShape::Expand(vec![1, 1, 1])));
        let d: TreeShape = "dyn:6,4,32".parse().unwrap();
        assert_eq!(d.to_string(), "dyn:6,4,32");
        assert_eq!(TreeShape::Expand(vec![2, 3]).max_nodes(), 1 + 2 + 6);
        for bad in ["", "0", "2,x", "dyn:1,2", "chain:", "16,16,16", "dyn:2,2,0"] {
            assert!(bad.parse::<TreeShape>().is_err(), "{bad}");
        }
    }
}
