//! A draft backed by a transformer: a smaller model sharing the target's tokenizer, or the
//! target's own first layers ([`Transformer::truncated`]).

use std::time::Instant;

use arbor_cache::KvCache;
use arbor_model::{ForwardInput, Transformer};
use burn::tensor::backend::Backend;
use rand::rngs::StdRng;

use crate::{Draft, DraftCost, DraftRequest, DrawKind, SpecError, TokenTree, expand};

/// A model draft with its own KV cache.
///
/// Grows the tree one level per batched forward (SpecInfer expansion or best-first dynamic
/// expansion). For greedy requests children are the draft's top-k (deterministic); otherwise
/// they are drawn from the draft's distribution under the request's sampling filters, without
/// replacement (or i.i.d., see [`ModelDraft::with_draw`]).
///
/// Between steps it keeps its cache rows for the part of its last tree that the target
/// accepted and drops the rest, so catching up costs no extra forward.
pub struct ModelDraft<B: Backend> {
    name: String,
    model: Transformer<B>,
    cache: KvCache<B>,
    /// The tokens whose rows fill the cache's committed part, in order.
    cached: Vec<u32>,
    /// The last tree and the cache row of each of its nodes (`None`: never fed).
    last: Option<(TokenTree, Vec<Option<usize>>)>,
    draw: DrawKind,
}

impl<B: Backend> std::fmt::Debug for ModelDraft<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDraft")
            .field("name", &self.name)
            .field("cached", &self.cached.len())
            .finish()
    }
}

impl<B: Backend> ModelDraft<B> {
    /// A draft running `model`. The caller checks that it shares the target's tokenizer.
    pub fn new(name: impl Into<String>, model: Transformer<B>) -> Self {
        let cache = model.new_cache();
        Self {
            name: name.into(),
            model,
            cache,
            cached: Vec::new(),
            last: None,
            draw: DrawKind::WithoutReplacement,
        }
    }

    /// How children are drawn for non-greedy requests ([`DrawKind::WithoutReplacement`] by
    /// default; [`DrawKind::Iid`] is SpecInfer's original scheme).
    #[must_use]
    pub fn with_draw(mut self, kind: DrawKind) -> Self {
        self.draw = kind;
        self
    }

    /// The model.
    pub fn model(&self) -> &Transformer<B> {
        &self.model
    }

    /// Brings the cache in line with `context[..n-1]` as far as it can without a forward and
    /// returns the tokens still to feed (at least the root).
    fn sync(&mut self, context: &[u32]) -> Vec<u32> {
        let n = context.len();
        let common = self
            .cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count();
        let last = self.last.take();
        if common == self.cached.len()
            && let Some((tree, rows)) = last
        {
            // The root of the last tree is `cached`'s last token; follow the newly committed
            // tokens down that tree and keep the rows it already has.
            let (node, matched) = tree.follow(&context[common..]);
            let path = tree.path(node);
            let keep: Vec<usize> = path[1..]
                .iter()
                .map_while(|&i| rows.get(i).copied().flatten())
                .take(matched.min((n - 1).saturating_sub(common)))
                .collect();
            self.cache.retain(common, &keep);
            self.cached
                .extend_from_slice(&context[common..common + keep.len()]);
        } else {
            let keep = common.min(n.saturating_sub(1));
            self.cache.truncate(keep);
            self.cached.truncate(keep);
        }
        if self.cached.len() >= n {
            self.cached.truncate(n - 1);
            self.cache.truncate(n - 1);
        }
        context[self.cached.len()..].to_vec()
    }
}

impl<B: Backend> Draft for ModelDraft<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn propose(
        &mut self,
        req: &DraftRequest<'_>,
        rng: &mut StdRng,
    ) -> Result<(TokenTree, DraftCost), SpecError> {
        let n = req.context.len();
        let root = *req.context.last().ok_or(SpecError::EmptyContext)?;
        // Room in the draft's context for the root and `depth` levels.
        let depth = req
            .shape
            .depth()
            .min(self.model.max_position().saturating_sub(n));
        if depth == 0 {
            return Ok((TokenTree::new(root), DraftCost::default()));
        }
        let pending = self.sync(req.context);
        let mut cost = DraftCost {
            forwards: 1,
            tokens: pending.len(),
            ..DraftCost::default()
        };
        let t0 = Instant::now();
        let input = ForwardInput::causal(&pending, self.cache.len());
        let root_logits = self
            .model
            .forward_last_logits(&input, &mut self.cache)?
            .swap_remove(0);
        cost.note_level(pending.len(), t0.elapsed().as_secs_f64());
        self.cached.extend_from_slice(&pending);
        let root_row = n - 1;
        let mut rows: Vec<Option<usize>> = vec![Some(root_row)];
        let (model, cache) = (&self.model, &mut self.cache);
        let (tree, map) = expand(
            root,
            root_logits,
            req,
            self.draw,
            depth,
            rng,
            |tree, fresh| {
                rows.resize(tree.len(), None);
                let input = tree.forward_input_for(fresh, n, cache.len(), &rows, root_row);
                let first_row = cache.len();
                let t0 = Instant::now();
                let logits = model.forward_all_logits(&input, cache)?;
                cost.note_level(fresh.len(), t0.elapsed().as_secs_f64());
                cost.forwards += 1;
                cost.tokens += fresh.len();
                for (k, &node) in fresh.iter().enumerate() {
                    rows[node] = Some(first_row + k);
                }
                Ok(logits)
            },
        )?;
        rows.resize(map.len(), None);
        let mut kept = vec![None; tree.len()];
        for (old, new) in map.iter().enumerate() {
            if let Some(new) = new {
                kept[*new] = rows[old];
            }
        }
        let rows = kept;
        self.last = Some((tree.clone(), rows));
        Ok((tree, cost))
    }

    fn prefill(&mut self, context: &[u32], chunk: usize) -> Result<(), SpecError> {
        // Everything but the last token (the first tree's root, fed when proposing).
        let Some((_, head)) = context.split_last() else {
            return Ok(());
        };
        let pending = self.sync(context);
        let todo = &pending[..pending.len() - 1];
        debug_assert!(self.cached.len() + todo.len() == head.len());
        for part in todo.chunks(chunk.max(1)) {
            let input = ForwardInput::causal(part, self.cache.len());
            self.model.forward(&input, &mut self.cache)?;
            self.cached.extend_from_slice(part);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
        self.last = None;
    }
}
