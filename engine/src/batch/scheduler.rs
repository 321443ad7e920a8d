//! The scheduler: decides, from token counts alone, what every sequence does in the next
//! step. It never touches tensors (vLLM v1's split); the executor ([`super::BatchEngine`])
//! carries the plan out.
//!
//! Policy, in order of priority within a step (Sarathi-Serve, arXiv 2403.02310):
//! 1. every decoding sequence gets its one row — running streams never stall;
//! 2. prompts are fed in fixed chunks of `prefill_chunk` tokens, first come first served,
//!    while the step stays within `max_batch_tokens` rows. Chunk boundaries are multiples of
//!    `prefill_chunk` from the prompt's start whatever else runs, so a sequence's arithmetic
//!    does not depend on its neighbours (batched output == alone, token for token);
//! 3. waiting requests are admitted while fewer than `max_running` run and their prompt's
//!    KV pages are free;
//! 4. speculation: draft-tree rows beyond each root are spent only while the step has fewer
//!    than `spec_max_rows` rows. Below that size a forward costs about the same however many
//!    rows it has (weights are read once; memory-bound), so tree nodes are nearly free; above
//!    it cost grows with rows and a tree's rejected nodes take time from other sequences'
//!    plain tokens — goodput is better decoding plainly. Set it from the verify-cost curve of
//!    the target on the machine (`arbor bench` prints it).
//!
//! KV pages are counted for the tokens each sequence holds (`page_size` tokens per page,
//! `kv_pages` in all). When a decode step would need a page and none is free, the most
//! recently admitted sequence is preempted: its cache is dropped and it waits at the front of
//! the queue to be recomputed (vLLM's recompute preemption).

/// Limits and sizes the scheduler works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting to start; more (beyond `max_running + max_waiting` in all) are
    /// refused.
    pub max_waiting: usize,
    /// Most rows (tokens) in one target forward.
    pub max_batch_tokens: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Tree rows are added only while a step has fewer rows than this.
    pub spec_max_rows: usize,
    /// Tokens per KV page.
    pub page_size: usize,
    /// KV pages in all.
    pub kv_pages: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_waiting: 64,
            max_batch_tokens: 512,
            prefill_chunk: 256,
            spec_max_rows: 8,
            page_size: 16,
            kv_pages: 4096,
        }
    }
}

impl SchedulerConfig {
    /// Checks that the limits can be met together.
    ///
    /// # Errors
    /// A message naming the first conflict.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_running", self.max_running),
            ("max_batch_tokens", self.max_batch_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("page_size", self.page_size),
            ("kv_pages", self.kv_pages),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.prefill_chunk > self.max_batch_tokens {
            return Err(format!(
                "prefill_chunk {} exceeds max_batch_tokens {}",
                self.prefill_chunk, self.max_batch_tokens
            ));
        }
        if self.max_running > self.max_batch_tokens {
            return Err(format!(
                "max_running {} exceeds max_batch_tokens {}: running sequences could not all \
                 decode in one step",
                self.max_running, self.max_batch_tokens
            ));
        }
        Ok(())
    }

    /// Pages that hold `tokens` tokens.
    pub fn pages(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }
}

/// What the scheduler knows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLoad {
    /// Tokens in its cache.
    pub cached: usize,
    /// Tokens to feed before it can decode (its prompt, or after a preemption its whole
    /// context); 0 while decoding.
    pub pending: usize,
    /// Most tree nodes a step of it may verify, root included (1: decodes plainly).
    pub tree_nodes: usize,
}

/// One sequence's part in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing this step (waits for room).
    Idle,
    /// Feed this many of its pending tokens.
    Prefill(usize),
    /// Verify a tree of at most this many nodes, root included (1: one plain token).
    Decode(usize),
    /// Drop its cache and send it back to the front of the queue.
    Preempt,
    /// End it: it runs alone and its next token needs more KV pages than there are.
    Abort,
}

/// The plan for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Waiting sequences (from the front) that start running now.
    pub admit: usize,
    /// Work for each running sequence, then for each admitted one, in order.
    pub work: Vec<Work>,
}

impl StepPlan {
    /// Rows of the step's target forward (trees counted at their most).
    pub fn rows(&self) -> usize {
        self.work
            .iter()
            .map(|w| match w {
                Work::Prefill(n) | Work::Decode(n) => *n,
                Work::Idle | Work::Preempt | Work::Abort => 0,
            })
            .sum()
    }
}

/// Plans steps; holds only its configuration.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
}

impl Scheduler {
    /// A scheduler with checked limits.
    ///
    /// # Errors
    /// As [`SchedulerConfig::validate`].
    pub fn new(config: SchedulerConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Self { config })
    }

    /// Its limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// KV pages the sequences hold.
    pub fn pages_used(&self, running: &[SeqLoad]) -> usize {
        running.iter().map(|s| self.config.pages(s.cached)).sum()
    }

    /// The next step for `running` sequences (in admission order) and `waiting` ones (queue
    /// order).
    pub fn plan(&self, running: &[SeqLoad], waiting: &[SeqLoad]) -> StepPlan {
        let c = &self.config;
        let mut work = vec![Work::Idle; running.len()];
        let mut free = c.kv_pages.saturating_sub(self.pages_used(running));
        // Pages one more token costs a sequence holding `cached`.
        let grow = |cached: usize, n: usize| c.pages(cached + n) - c.pages(cached);

        // 1. Decodes, preempting the newest sequences when pages run out.
        let mut live = running.len();
        let mut i = 0;
        while i < live {
            let s = running[i];
            if s.pending == 0 {
                let need = grow(s.cached, 1);
                while need > free && live > i + 1 {
                    live -= 1;
                    work[live] = Work::Preempt;
                    free += c.pages(running[live].cached);
                }
                if need > free {
                    // Nobody newer is left to preempt. With older sequences running it waits
                    // for their pages; alone, the pool cannot hold its context at all.
                    work[i] = if i == 0 { Work::Abort } else { Work::Preempt };
                    free += c.pages(s.cached);
                    live = i;
                    break;
                }
                // Only the one-row need is booked here; tree rows are transient.
                free -= need;
                work[i] = Work::Decode(1);
            }
            i += 1;
        }
        let mut rows = work.iter().filter(|w| matches!(w, Work::Decode(_))).count();

        // 2. Prefill chunks of running sequences, first come first served.
        let chunk_for = |s: &SeqLoad, rows: &mut usize, free: &mut usize| -> Option<usize> {
            let n = s.pending.min(c.prefill_chunk);
            let pages = grow(s.cached, n);
            (*rows + n <= c.max_batch_tokens && pages <= *free).then(|| {
                *rows += n;
                *free -= pages;
                n
            })
        };
        for (s, w) in running[..live].iter().zip(&mut work[..live]) {
            if s.pending > 0
                && let Some(n) = chunk_for(s, &mut rows, &mut free)
            {
                *w = Work::Prefill(n);
            }
        }

        // 3. Admission: while there is room to run and pages for the whole pending prompt.
        let mut admit = 0;
        let mut reserved = 0;
        let preempted = running.len() - live;
        for s in waiting {
            if live + admit >= c.max_running || preempted > 0 {
                break;
            }
            let all = c.pages(s.cached + s.pending);
            if all > free.saturating_sub(reserved) {
                break;
            }
            admit += 1;
            match chunk_for(s, &mut rows, &mut free) {
                Some(n) => {
                    reserved += all - grow(s.cached, n);
                    work.push(Work::Prefill(n));
                }
                None => {
                    reserved += all;
                    work.push(Work::Idle);
                }
            }
        }

        // 4. Speculation: extra tree rows while the step is below `spec_max_rows`.
        let spec: Vec<usize> = (0..live)
            .filter(|&i| running[i].tree_nodes > 1 && work[i] == Work::Decode(1))
            .collect();
        let mut extra = c.spec_max_rows.saturating_sub(rows);
        let mut left = spec.len();
        for i in spec {
            let share = extra / left.max(1);
            left -= 1;
            let s = running[i];
            let mut nodes = (share + 1).min(s.tree_nodes);
            // Tree rows sit in the cache until the commit: they need pages too.
            while nodes > 1 && grow(s.cached + 1, nodes - 1) > free {
                nodes -= 1;
            }
            extra -= nodes - 1;
            work[i] = Work::Decode(nodes);
        }
        StepPlan { admit, work }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            max_running: 4,
            max_waiting: 8,
            max_batch_tokens: 64,
            prefill_chunk: 32,
            spec_max_rows: 8,
            page_size: 16,
            kv_pages: 100,
        }
    }

    fn decoding(cached: usize, tree_nodes: usize) -> SeqLoad {
        SeqLoad {
            cached,
            pending: 0,
            tree_nodes,
        }
    }

    fn prompt(pending: usize) -> SeqLoad {
        SeqLoad {
            cached: 0,
            pending,
            tree_nodes: 1,
        }
    }

    #[test]
    fn decodes_first_then_fixed_prefill_chunks_within_the_token_budget() {
        let s = Scheduler::new(config()).unwrap();
        let running = [decoding(10, 1), prompt(100), prompt(20), decoding(5, 1)];
        let plan = s.plan(&running, &[]);
        // 2 decode rows + a full 32-token chunk; the next prompt's 20 would make 54 ≤ 64.
        assert_eq!(
            plan.work,
            vec![
                Work::Decode(1),
                Work::Prefill(32),
                Work::Prefill(20),
                Work::Decode(1)
            ]
        );
        // Chunks are never cut to fit: with a 40-row budget the 20-token prompt waits.
        let s = Scheduler::new(SchedulerConfig {
            max_batch_tokens: 40,
            ..config()
        })
        .unwrap();
        let plan = s.plan(&running, &[]);
        assert_eq!(plan.work[2], Work::Idle);
        assert!(plan.rows() <= 40);
    }

    #[test]
    fn admission_respects_running_limit_and_pages() {
        let s = Scheduler::new(config()).unwrap();
        let waiting = [prompt(10), prompt(10), prompt(10), prompt(10), prompt(10)];
        let plan = s.plan(&[], &waiting);
        assert_eq!(plan.admit, 4);
        // 4 × 10 rows fit 64; all start at once.
        assert!(plan.work.iter().all(|w| *w == Work::Prefill(10)));

        // 3 pages in all: a 40-token prompt (3 pages) fits, the next must wait.
        let s = Scheduler::new(SchedulerConfig {
            kv_pages: 3,
            ..config()
        })
        .unwrap();
        let plan = s.plan(&[], &[prompt(40), prompt(1)]);
        assert_eq!(plan.admit, 1);
        assert_eq!(plan.work, vec![Work::Prefill(32)]);
    }

    #[test]
    fn preempts_the_newest_when_a_decode_needs_a_page() {
        let s = Scheduler::new(SchedulerConfig {
            kv_pages: 4,
            ..config()
        })
        .unwrap();
        // 32 + 15 + 16 tokens hold 4 pages; the first needs a 5th for its next token, the
        // second's 16th token still fits its page.
        let running = [decoding(32, 1), decoding(15, 1), decoding(16, 1)];
        let plan = s.plan(&running, &[prompt(1)]);
        assert_eq!(
            plan.work,
            vec![Work::Decode(1), Work::Decode(1), Work::Preempt]
        );
        assert_eq!(
            plan.admit, 0,
            "nobody is admitted past a preempted sequence"
        );
        // Both newer ones at a page boundary: both go.
        let running = [decoding(32, 1), decoding(16, 1), decoding(16, 1)];
        let plan = s.plan(&running, &[]);
        assert_eq!(
            plan.work,
            vec![Work::Decode(1), Work::Preempt, Work::Preempt]
        );
        // Alone and out of pages: it cannot go on.
        let plan = s.plan(&[decoding(64, 1)], &[]);
        assert_eq!(plan.work, vec![Work::Abort]);
    }

    #[test]
    fn tree_rows_only_below_the_speculation_knee() {
        let s = Scheduler::new(config()).unwrap();
        // Two decoders wanting 5-node trees: 8 rows allowed → 4 + 4.
        let plan = s.plan(&[decoding(3, 5), decoding(3, 5)], &[]);
        assert_eq!(plan.work, vec![Work::Decode(4), Work::Decode(4)]);
        // Eight decoders already fill the knee: everyone decodes plainly.
        let running = vec![decoding(3, 5); 8];
        let s = Scheduler::new(SchedulerConfig {
            max_running: 8,
            ..config()
        })
        .unwrap();
        let plan = s.plan(&running, &[]);
        assert!(plan.work.iter().all(|w| *w == Work::Decode(1)));
        // A prefill chunk in the step leaves no room for trees either.
        let plan = s.plan(&[decoding(3, 5), prompt(32)], &[]);
        assert_eq!(plan.work, vec![Work::Decode(1), Work::Prefill(32)]);
    }

    #[test]
    fn bad_limits_are_refused() {
        for bad in [
            SchedulerConfig {
                max_running: 0,
                ..config()
            },
            SchedulerConfig {
                prefill_chunk: 65,
                ..config()
            },
            SchedulerConfig {
                max_running: 65,
                ..config()
            },
        ] {
            assert!(Scheduler::new(bad).is_err());
        }
    }
}
