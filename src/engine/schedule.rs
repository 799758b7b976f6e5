//! Continuous batching as a pure scheduler, kept free of llama.cpp calls so it is tested on
//! its own (as TGI tests `State::next_batch`): who is admitted between steps and into which
//! slot, the KV cells each sequence reserves, the prefix-cache map, and the work of each
//! decode step. The runner in [`super::llama`] owns the llama.cpp context; it asks the
//! scheduler for work, applies it (batch, decode, KV clears), samples, and reports back.
//!
//! ```text
//! enqueue ─► waiting ─admit─► live: Prefilling ─(last chunk decoded, token sampled)─► Generating
//!                                    │                                                   │
//!                                    └───────────── Finished / Failed ◄──────────────────┘
//!                                                        │ retire
//!                                                        ▼
//!                                          slot free (cells cleared, or kept as a prefix)
//! ```
//!
//! `P` is what the runner keeps per sequence (sampler, text decoder, event channel, spans);
//! the scheduler carries it along and never looks inside.

use std::collections::{BTreeSet, VecDeque};

use llama_cpp_2::token::LlamaToken;

use super::FinishReason;

/// A llama.cpp sequence id: one per slot.
pub type SeqId = i32;

/// Where one live sequence stands, as llama.cpp's server keeps one `slot_state` per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqState {
    /// `done` prompt tokens are in the KV cache; chunks keep coming until all are.
    Prefilling { done: usize },
    /// `pending` was sampled and sent; the next step decodes it.
    Generating { pending: LlamaToken },
    /// Ended (its last event is sent); it leaves at the end of the step.
    Finished(FinishReason),
    /// A decode failed: it leaves, and what its cells hold is unknown.
    Failed,
    /// One of a request's extra choices (`n` > 1), waiting for the sequence `leader` to
    /// finish prefilling their shared prompt: then its cells are copied here and it
    /// samples its own first token from the same logits ([`Scheduler::fork`]).
    Forked { leader: SeqId },
}

/// A request that passed every check and waits for a slot.
#[derive(Debug)]
pub struct Waiting<P> {
    pub prompt: Vec<LlamaToken>,
    pub max_new_tokens: u32,
    pub payload: P,
    /// The payloads of the request's other choices (`n` - 1): each takes a slot of its
    /// own, and the prompt is prefilled once, by the first.
    pub siblings: Vec<P>,
}

impl<P> Waiting<P> {
    /// KV cells one of the request's sequences may need at most.
    pub fn reservation(&self) -> u32 {
        self.prompt.len() as u32 + self.max_new_tokens
    }

    /// Slots the request takes: one per choice.
    pub fn slots(&self) -> usize {
        1 + self.siblings.len()
    }

    /// KV cells the whole request may need: it is admitted only when they are free.
    pub fn group_reservation(&self) -> u32 {
        self.reservation().saturating_mul(self.slots() as u32)
    }
}

/// One admitted request holding a slot and KV cells.
#[derive(Debug)]
pub struct Sequence<P> {
    pub seq_id: SeqId,
    pub prompt: Vec<LlamaToken>,
    pub state: SeqState,
    /// Next free position of this sequence.
    pub n_past: i32,
    pub generated: u32,
    pub max_new_tokens: u32,
    pub reservation: u32,
    /// Generated tokens already decoded into the KV cache, in order.
    pub decoded: Vec<LlamaToken>,
    /// Prompt tokens reused from the slot's cells at admission.
    pub cached_prompt_tokens: usize,
    pub payload: P,
}

impl<P> Sequence<P> {
    /// Prompt tokens in the KV cache.
    pub fn prompt_done(&self) -> usize {
        match self.state {
            SeqState::Prefilling { done } => done,
            // A forked choice never prefills: its leader does.
            _ => self.prompt.len(),
        }
    }

    pub fn prompt_left(&self) -> usize {
        self.prompt.len() - self.prompt_done()
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, SeqState::Finished(_) | SeqState::Failed)
    }

    /// The tokens whose KV cells this sequence holds, positions 0.. in order; `None` when
    /// that is not known for sure (a failed decode, or cells not matching the count).
    pub fn tokens_in_kv(&self) -> Option<Vec<LlamaToken>> {
        let done = match self.state {
            SeqState::Failed | SeqState::Forked { .. } => return None,
            SeqState::Prefilling { done } => done,
            _ => self.prompt.len(),
        };
        if done + self.decoded.len() != self.n_past as usize {
            return None;
        }
        let mut tokens = self.prompt[..done].to_vec();
        tokens.extend_from_slice(&self.decoded);
        Some(tokens)
    }

    /// Decode steps until this sequence is expected to leave: the rest of its prompt (in
    /// step-equivalents), then the tokens an average reply still has to come, never more
    /// than its `max_tokens` allows. Until a reply has finished, the cap is the estimate.
    pub fn expected_steps_left(
        &self,
        expected_reply: Option<f64>,
        prefill_s_per_token: f64,
        step_s: f64,
    ) -> u32 {
        let cap_left = self.max_new_tokens.saturating_sub(self.generated);
        let reply_left = match expected_reply {
            Some(tokens) => {
                ((tokens - f64::from(self.generated)).ceil().max(1.0) as u32).min(cap_left)
            }
            None => cap_left,
        };
        let prefill_steps = if step_s > 0.0 {
            (self.prompt_left() as f64 * prefill_s_per_token / step_s).ceil() as u32
        } else {
            0
        };
        prefill_steps.saturating_add(reply_left)
    }
}

/// What one live sequence (by its index in [`Scheduler::live`]) contributes to a decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Decode { seq: usize },
    Prompt { seq: usize, tokens: usize },
}

impl Work {
    pub fn seq(self) -> usize {
        match self {
            Work::Decode { seq } | Work::Prompt { seq, .. } => seq,
        }
    }
}

/// A sequence just admitted, for the runner to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Index in [`Scheduler::live`].
    pub index: usize,
    pub seq_id: SeqId,
    /// Prompt tokens whose cells the slot already holds.
    pub reused: usize,
    /// Cells from this position on must be cleared first (the slot's cached prefix went
    /// further than this prompt shares); `Some(0)` clears the slot.
    pub clear_from: Option<u32>,
}

/// How a step that found the KV cache full was shrunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvShrink {
    /// Prompt chunks wait for a later step.
    PromptsDeferred,
    /// This generating sequence ends with `length`.
    EndNewest(usize),
    /// This prefilling sequence fails: nothing in the step would free cells for it.
    FailNewest(usize),
}

/// What to do with a leaving sequence's cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Clear them.
    Clear(SeqId),
    /// Keep them: the slot remembers them as a prefix for the next prompt.
    Keep(SeqId),
}

/// The scheduler's settings, fixed when the model loads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub slots: u32,
    /// KV cells in the context (all slots together).
    pub total_cells: u32,
    /// Tokens one decode call may carry (llama.cpp's `n_batch`).
    pub batch_capacity: usize,
    /// See [`prompt_chunks`].
    pub prefill_chunk: usize,
    /// Keep a leaving sequence's cells as a prefix for the next prompt in its slot.
    pub prefix_cache: bool,
    /// The model's attention window on sliding-window layers (Gemma 3 270M: 512), if any.
    /// A cached prefix is reused only while its slot still holds the window before the cut.
    pub sliding_window: Option<u32>,
}

/// What a free slot's cells still hold for the next prompt.
#[derive(Debug, Clone, Default)]
struct CachedPrefix {
    /// The tokens at positions 0.. (empty: nothing kept, the cells were cleared).
    tokens: Vec<LlamaToken>,
    /// The lowest position a sliding-window layer still holds cells for. llama.cpp
    /// overwrites a window's oldest cells only when its cache runs short, so short
    /// conversations keep them all (0) and long ones lose their start.
    window_start: i32,
    /// When the prefix was written (its sequence left the slot), on [`Scheduler::clock`];
    /// 0 for a slot holding nothing. The least recently written prefix is the one evicted
    /// when nothing else decides.
    last_used: u64,
}

pub struct Scheduler<P> {
    limits: Limits,
    /// Sum of the live sequences' reservations.
    reserved_cells: u32,
    /// Ordered, so `pop_first` hands out the lowest free id: see [`Scheduler::plan`].
    free_seq_ids: BTreeSet<SeqId>,
    /// Per seq id: what a free slot's cells still hold (nothing while in use).
    cached_prefix: Vec<CachedPrefix>,
    /// Counts releases, to order cached prefixes by last use.
    clock: u64,
    /// Not yet admitted (no slot or not enough free cells), oldest first.
    waiting: VecDeque<Waiting<P>>,
    /// Admitted, oldest first.
    live: Vec<Sequence<P>>,
}

impl<P> Scheduler<P> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reserved_cells: 0,
            free_seq_ids: (0..limits.slots as SeqId).collect(),
            cached_prefix: vec![CachedPrefix::default(); limits.slots as usize],
            clock: 0,
            waiting: VecDeque::new(),
            live: Vec::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn enqueue(&mut self, request: Waiting<P>) {
        self.waiting.push_back(request);
    }

    pub fn waiting(&self) -> &VecDeque<Waiting<P>> {
        &self.waiting
    }

    pub fn live(&self) -> &[Sequence<P>] {
        &self.live
    }

    pub fn sequence_mut(&mut self, index: usize) -> &mut Sequence<P> {
        &mut self.live[index]
    }

    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.waiting.is_empty()
    }

    pub fn free_slots(&self) -> usize {
        self.free_seq_ids.len()
    }

    /// The lowest free slot, for a warm-up decode before any request.
    pub fn lowest_free_slot(&self) -> Option<SeqId> {
        self.free_seq_ids.first().copied()
    }

    /// Prompt tokens not yet in the KV cache: the waiting requests' and the rest of the
    /// prefilling ones'.
    pub fn pending_prompt_tokens(&self) -> usize {
        let queued: usize = self.waiting.iter().map(|r| r.prompt.len()).sum();
        let prefilling: usize = self.live.iter().map(Sequence::prompt_left).sum();
        queued + prefilling
    }

    /// KV cells the live sequences use now.
    pub fn cells_in_use(&self) -> u64 {
        self.live.iter().map(|s| s.n_past as u64).sum()
    }

    /// Removes the waiting requests `gone` says are gone; returns how many.
    pub fn drop_waiting(&mut self, gone: impl Fn(&P) -> bool) -> usize {
        let before = self.waiting.len();
        self.waiting.retain(|request| !gone(&request.payload));
        before - self.waiting.len()
    }

    /// Takes out the live sequences `gone` says are gone, and those that are over; the
    /// runner then hands each to [`Scheduler::release`].
    pub fn take_leaving(&mut self, gone: impl Fn(&P) -> bool) -> Vec<Sequence<P>> {
        let (leaving, staying) = std::mem::take(&mut self.live)
            .into_iter()
            .partition(|seq| seq.is_over() || gone(&seq.payload));
        self.live = staying;
        leaving
    }

    /// Admits waiting requests in arrival order while a slot and their reservation are free.
    pub fn admit(&mut self) -> Vec<Admitted> {
        let admitted = admit_count(
            self.waiting
                .iter()
                .map(|request| (request.slots(), request.group_reservation())),
            self.free_seq_ids.len(),
            self.limits.total_cells - self.reserved_cells,
        );
        let mut out = Vec::with_capacity(admitted);
        for _ in 0..admitted {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            let Some((seq_id, reused, clear_from)) = self.take_slot(&request.prompt) else {
                self.waiting.push_front(request);
                break;
            };
            let reservation = request.reservation();
            let Waiting {
                prompt,
                max_new_tokens,
                payload,
                siblings,
            } = request;
            self.reserved_cells += reservation;
            out.push(Admitted {
                index: self.live.len(),
                seq_id,
                reused,
                clear_from,
            });
            let sibling_prompt = (!siblings.is_empty()).then(|| prompt.clone());
            self.live.push(Sequence {
                seq_id,
                prompt,
                state: SeqState::Prefilling { done: reused },
                n_past: reused as i32,
                generated: 0,
                max_new_tokens,
                reservation,
                decoded: Vec::new(),
                cached_prompt_tokens: reused,
                payload,
            });
            for sibling in siblings {
                // `admit_count` counted a slot for each.
                let Some(sibling_id) = self.free_seq_ids.pop_first() else {
                    break;
                };
                // Its cells are replaced by the leader's when it forks.
                let cached = std::mem::take(&mut self.cached_prefix[sibling_id as usize]);
                self.reserved_cells += reservation;
                out.push(Admitted {
                    index: self.live.len(),
                    seq_id: sibling_id,
                    reused: 0,
                    clear_from: (!cached.tokens.is_empty()).then_some(0),
                });
                self.live.push(Sequence {
                    seq_id: sibling_id,
                    prompt: sibling_prompt.clone().unwrap_or_default(),
                    state: SeqState::Forked { leader: seq_id },
                    n_past: 0,
                    generated: 0,
                    max_new_tokens,
                    reservation,
                    decoded: Vec::new(),
                    cached_prompt_tokens: 0,
                    payload: sibling,
                });
            }
        }
        out
    }

    /// Live sequence `leader` has prefilled its prompt: its forked choices become
    /// sequences whose prompt is in the cache (the runner copies the cells). Returns
    /// their indexes in [`Scheduler::live`].
    pub fn fork(&mut self, leader: usize) -> Vec<usize> {
        let leader_id = self.live[leader].seq_id;
        let n_past = self.live[leader].n_past;
        let mut forked = Vec::new();
        for (index, seq) in self.live.iter_mut().enumerate() {
            if seq.state == (SeqState::Forked { leader: leader_id }) {
                seq.state = SeqState::Prefilling {
                    done: seq.prompt.len(),
                };
                seq.n_past = n_past;
                seq.cached_prompt_tokens = seq.prompt.len();
                forked.push(index);
            }
        }
        forked
    }

    /// Forked choices whose leader left before it forked them (it failed, or its
    /// client went away): they can never start.
    pub fn orphaned_forks(&self) -> Vec<usize> {
        let leading = |id: SeqId| {
            self.live
                .iter()
                .any(|s| s.seq_id == id && matches!(s.state, SeqState::Prefilling { .. }))
        };
        (0..self.live.len())
            .filter(
                |&i| matches!(self.live[i].state, SeqState::Forked { leader } if !leading(leader)),
            )
            .collect()
    }

    /// Takes a free slot for `prompt` (see [`choose_slot`]): the slot, how many prompt
    /// tokens its cells already hold (at least one token is always left to prefill: its
    /// logits give the first sampled token), and from where its cells must be cleared.
    fn take_slot(&mut self, prompt: &[LlamaToken]) -> Option<(SeqId, usize, Option<u32>)> {
        if !self.limits.prefix_cache {
            return Some((self.free_seq_ids.pop_first()?, 0, None));
        }
        let slots = self.limits.slots as SeqId;
        let in_use = |id: SeqId| (0..slots).contains(&id) && !self.free_seq_ids.contains(&id);
        let free: Vec<FreeSlot> = self
            .free_seq_ids
            .iter()
            .map(|&id| {
                let cached = &self.cached_prefix[id as usize];
                FreeSlot {
                    seq_id: id,
                    reuse: usable_prefix(
                        common_prefix_len(&cached.tokens, prompt),
                        prompt.len(),
                        cached.window_start,
                        self.limits.sliding_window,
                    ),
                    last_used: cached.last_used,
                    neighbours_in_use: u8::from(in_use(id - 1)) + u8::from(in_use(id + 1)),
                }
            })
            .collect();
        let chosen = choose_slot(&free)?;
        self.free_seq_ids.remove(&chosen.seq_id);
        let cached = std::mem::take(&mut self.cached_prefix[chosen.seq_id as usize]);
        // Cells of a slot with nothing cached were cleared when it was released.
        let clear_from = (chosen.reuse < cached.tokens.len()).then_some(chosen.reuse as u32);
        Some((chosen.seq_id, chosen.reuse, clear_from))
    }

    /// The runner could not clear a reused slot's cells past the prefix and cleared the
    /// whole slot instead: the sequence prefills its prompt from the start.
    pub fn forget_reuse(&mut self, index: usize) {
        let seq = &mut self.live[index];
        seq.state = SeqState::Prefilling { done: 0 };
        seq.n_past = 0;
        seq.cached_prompt_tokens = 0;
    }

    /// The next decode call's work: every generating sequence's token first (only when
    /// n_ctx clamps the batch below `slots` do some wait a step), then prompt chunks in
    /// admission order. Written in seq-id order: with a split KV cache llama.cpp cuts a
    /// batch into micro-batches of sequences whose ids run consecutively in batch order
    /// (`split_equal(.., sequential = true)`), each a full pass over the weights; slots
    /// are chosen to keep the ids in use consecutive ([`choose_slot`]), so a step stays
    /// one pass as far as the prefixes allow.
    pub fn plan(&self) -> Vec<Work> {
        let mut work: Vec<Work> = self
            .live
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, SeqState::Generating { .. }))
            .map(|(seq, _)| Work::Decode { seq })
            .take(self.limits.batch_capacity)
            .collect();
        let prefilling: Vec<usize> = (0..self.live.len())
            .filter(|&i| {
                matches!(self.live[i].state, SeqState::Prefilling { .. })
                    && self.live[i].prompt_left() > 0
            })
            .collect();
        let remaining: Vec<usize> = prefilling
            .iter()
            .map(|&i| self.live[i].prompt_left())
            .collect();
        let chunks = prompt_chunks(
            self.limits.batch_capacity,
            work.len(),
            self.limits.prefill_chunk,
            &remaining,
        );
        work.extend(
            prefilling
                .into_iter()
                .zip(chunks)
                .filter(|&(_, tokens)| tokens > 0)
                .map(|(seq, tokens)| Work::Prompt { seq, tokens }),
        );
        work.sort_by_key(|w| self.live[w.seq()].seq_id);
        work
    }

    /// The decode call for `work` succeeded: the cells now hold what it carried.
    pub fn decoded(&mut self, work: &[Work]) {
        for w in work {
            let seq = &mut self.live[w.seq()];
            match (*w, seq.state) {
                (Work::Decode { .. }, SeqState::Generating { pending }) => {
                    seq.decoded.push(pending);
                    seq.n_past += 1;
                }
                (Work::Prompt { tokens, .. }, SeqState::Prefilling { done }) => {
                    seq.state = SeqState::Prefilling {
                        done: done + tokens,
                    };
                    seq.n_past += tokens as i32;
                }
                // Planned work always matches the state it was planned from.
                _ => {}
            }
        }
    }

    /// A token was sampled for live sequence `index` and sent: it is decoded next step.
    pub fn sampled(&mut self, index: usize, token: LlamaToken) {
        let seq = &mut self.live[index];
        seq.generated += 1;
        seq.state = SeqState::Generating { pending: token };
    }

    /// Ends live sequence `index`; it leaves at the next [`Scheduler::take_leaving`].
    pub fn finish(&mut self, index: usize, reason: FinishReason) {
        let seq = &mut self.live[index];
        if !seq.is_over() {
            seq.state = SeqState::Finished(reason);
        }
    }

    /// A decode carrying these sequences failed: they end, and their cells are not trusted.
    pub fn fail(&mut self, work: &[Work]) {
        for w in work {
            self.live[w.seq()].state = SeqState::Failed;
        }
    }

    /// The KV cache was full for `work`: shrink it for a retry, and say what the runner
    /// must tell a client. Prompt chunks wait while sequences are generating (their cells
    /// free as they finish); then the newest generating sequence is ended. With only
    /// prompts in the step nothing will free cells, so waiting would retry the same chunk
    /// forever: the newest prefilling sequence fails instead.
    pub fn shrink_for_kv(&mut self, work: &mut Vec<Work>) -> Option<KvShrink> {
        let decoding = work.iter().any(|w| matches!(w, Work::Decode { .. }));
        let prompting = work.iter().any(|w| matches!(w, Work::Prompt { .. }));
        if decoding && prompting {
            work.retain(|w| matches!(w, Work::Decode { .. }));
            return Some(KvShrink::PromptsDeferred);
        }
        // `live` is in admission order, so the largest index is the newest.
        let newest = work.iter().map(|w| w.seq()).max()?;
        work.retain(|w| w.seq() != newest);
        Some(if decoding {
            KvShrink::EndNewest(newest)
        } else {
            KvShrink::FailNewest(newest)
        })
    }

    /// Frees a leaving sequence's slot and reservation; says what to do with its cells.
    /// `window_start` is the lowest position its sliding-window cells still hold
    /// (llama.cpp's `seq_pos_min`; ignored for models without a window).
    pub fn release(&mut self, seq: &Sequence<P>, window_start: i32) -> Release {
        self.reserved_cells -= seq.reservation;
        self.free_seq_ids.insert(seq.seq_id);
        self.clock += 1;
        // With the prefix cache the cells stay, and the slot remembers what they hold; a
        // later prompt that starts the same way skips that much prefill.
        match self
            .limits
            .prefix_cache
            .then(|| seq.tokens_in_kv())
            .flatten()
        {
            Some(tokens) => {
                self.cached_prefix[seq.seq_id as usize] = CachedPrefix {
                    tokens,
                    window_start,
                    last_used: self.clock,
                };
                Release::Keep(seq.seq_id)
            }
            // Holding nothing, the slot keeps `last_used` 0 from `take_slot`: it is the
            // first to go, before any slot with a prefix worth keeping.
            None => Release::Clear(seq.seq_id),
        }
    }

    /// Decode steps until each live sequence is expected to leave, soonest first.
    pub fn steps_to_release(
        &self,
        expected_reply: Option<f64>,
        prefill_s_per_token: f64,
        step_s: f64,
    ) -> Vec<u32> {
        let mut steps: Vec<u32> = self
            .live
            .iter()
            .map(|seq| seq.expected_steps_left(expected_reply, prefill_s_per_token, step_s))
            .collect();
        steps.sort_unstable();
        steps
    }
}

/// How many of the waiting requests (in arrival order, each given by the KV cells it
/// reserves: prompt plus the most tokens it may generate) can start now.
///
/// Admission is first-come first-served: the head of the queue is never overtaken by a
/// smaller request behind it, so a long prompt cannot starve. A request is admitted only
/// if its whole reservation fits, which is what keeps a full KV cache from ever ending a
/// running sequence early.
pub fn admit_count(
    waiting: impl IntoIterator<Item = (usize, u32)>,
    free_slots: usize,
    free_cells: u32,
) -> usize {
    let mut cells_left = free_cells;
    let mut slots_left = free_slots;
    let mut admitted = 0;
    for (slots, reservation) in waiting {
        if slots > slots_left || reservation > cells_left {
            break;
        }
        cells_left -= reservation;
        slots_left -= slots;
        admitted += 1;
    }
    admitted
}

/// Splits one decode call's token budget. Every generating sequence gets its one token
/// first (inter-token latency of running streams comes first, as in llama.cpp's server);
/// waiting prompts fill what is left, oldest first, in chunks. While any sequence is
/// generating, prompts get at most `prefill_chunk` tokens per call (chunked prefill, as
/// vLLM does): the step's time grows with its prompt tokens, and every running stream
/// waits for the step.
///
/// Returns, for each prefilling sequence in order, how many prompt tokens it feeds this step
/// (possibly 0).
pub fn prompt_chunks(
    batch_capacity: usize,
    decoding: usize,
    prefill_chunk: usize,
    prompt_remaining: &[usize],
) -> Vec<usize> {
    let mut budget = batch_capacity.saturating_sub(decoding);
    if decoding > 0 {
        budget = budget.min(prefill_chunk);
    }
    prompt_remaining
        .iter()
        .map(|&remaining| {
            let take = remaining.min(budget);
            budget -= take;
            take
        })
        .collect()
}

/// Tokens at the start of `cached` and `prompt` that are the same.
pub fn common_prefix_len<T: PartialEq>(cached: &[T], prompt: &[T]) -> usize {
    cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
}

/// Prompt tokens a cached prefix can save when a new prompt shares `shared` of them:
/// all but the prompt's last token (whose logits give the first sampled token), and
/// nothing when the cut would fall where a sliding-window layer no longer holds the
/// window before it. The rule is llama.cpp server's (a slot is re-prefilled when
/// `pos_min > n_past - n_swa`): the cells must reach back to `reuse - window`, one
/// position further than the mask needs (a query at `q` sees keys after `q - window`).
pub fn usable_prefix(
    shared: usize,
    prompt_len: usize,
    window_start: i32,
    sliding_window: Option<u32>,
) -> usize {
    let reuse = shared.min(prompt_len.saturating_sub(1));
    match sliding_window {
        Some(window) if reuse > 0 => {
            let needed_from = reuse.saturating_sub(window as usize);
            // -1 (no cells at all) never holds a window.
            let holds_window = usize::try_from(window_start).is_ok_and(|s| s <= needed_from);
            if holds_window {
                reuse
            } else {
                0
            }
        }
        _ => reuse,
    }
}

/// What [`choose_slot`] knows of one free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSlot {
    pub seq_id: SeqId,
    /// Prompt tokens its cells would save ([`usable_prefix`]).
    pub reuse: usize,
    /// When its cached prefix was last used: smaller is older.
    pub last_used: u64,
    /// How many of the ids beside it (`seq_id ± 1`) are in use.
    pub neighbours_in_use: u8,
}

/// What a gap in the ids of the live sequences costs, in prompt tokens. With a split KV
/// cache llama.cpp cuts each decode call into one pass over the weights per run of
/// consecutive seq ids (see [`Scheduler::plan`]); a sequence that opens a new run costs
/// every live stream another pass on each step it lives, which only a long saved prefill
/// is worth.
pub const GAP_COST_TOKENS: i64 = 64;

/// A shared prefix shorter than this (a template's opening tokens) saves too little to
/// outweigh which prefix gets evicted: it counts as no match.
pub const MIN_REUSE_TOKENS: usize = 16;

/// Chooses the slot for a new sequence, as llama.cpp's server prefers the slot whose cached
/// prompt is most similar, with the cost of a gap in the ids weighed in: the slot that
/// saves the most prefill, less [`GAP_COST_TOKENS`] if taking it opens a new run of ids
/// (and plus that much if it joins two runs). Among equals, the least recently used prefix
/// is evicted, so a conversation between turns keeps its cells as long as possible.
pub fn choose_slot(free: &[FreeSlot]) -> Option<FreeSlot> {
    let score = |slot: &FreeSlot| {
        let saved = if slot.reuse >= MIN_REUSE_TOKENS {
            slot.reuse as i64
        } else {
            0
        };
        // Runs of consecutive ids in use: +1 with no neighbour in use, -1 with both.
        let new_runs = 1 - i64::from(slot.neighbours_in_use);
        saved - GAP_COST_TOKENS * new_runs
    };
    free.iter().copied().max_by_key(|slot| {
        (
            score(slot),
            std::cmp::Reverse(slot.last_used),
            std::cmp::Reverse(slot.seq_id),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_stops_at_the_first_difference() {
        assert_eq!(common_prefix_len(&[1, 2, 3, 4], &[1, 2, 9, 4]), 2);
        assert_eq!(common_prefix_len(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix_len::<i32>(&[], &[1]), 0);
    }

    fn free_slot(seq_id: SeqId, reuse: usize, last_used: u64, neighbours_in_use: u8) -> FreeSlot {
        FreeSlot {
            seq_id,
            reuse,
            last_used,
            neighbours_in_use,
        }
    }

    #[test]
    fn a_conversation_goes_back_to_the_slot_holding_its_history() {
        assert_eq!(choose_slot(&[]), None);
        // Idle engine: slot 5 holds 300 tokens of this conversation.
        let free = [
            free_slot(0, 0, 1, 0),
            free_slot(5, 300, 2, 0),
            free_slot(9, 20, 3, 0),
        ];
        assert_eq!(choose_slot(&free).map(|s| s.seq_id), Some(5));
    }

    #[test]
    fn a_gap_in_the_ids_must_be_paid_for_by_a_long_saved_prefill() {
        // Slot 3 continues the run 0..=2; slot 7 would open a second run.
        let short = [free_slot(3, 20, 9, 1), free_slot(7, 80, 1, 0)];
        assert_eq!(choose_slot(&short).map(|s| s.seq_id), Some(3));
        let long = [free_slot(3, 20, 9, 1), free_slot(7, 90, 1, 0)];
        assert_eq!(choose_slot(&long).map(|s| s.seq_id), Some(7));
        // Filling a hole between two runs merges them: worth more than a match.
        let hole = [free_slot(4, 0, 9, 2), free_slot(8, 60, 1, 1)];
        assert_eq!(choose_slot(&hole).map(|s| s.seq_id), Some(4));
    }

    #[test]
    fn among_equal_slots_the_least_recently_used_prefix_is_evicted() {
        let free = [
            free_slot(2, 0, 7, 0),
            free_slot(6, 0, 3, 0),
            free_slot(9, 0, 5, 0),
        ];
        assert_eq!(choose_slot(&free).map(|s| s.seq_id), Some(6));
        // A few shared template tokens are no reason to evict a fresher prefix.
        let free = [free_slot(2, 5, 7, 0), free_slot(6, 3, 3, 0)];
        assert_eq!(choose_slot(&free).map(|s| s.seq_id), Some(6));
        // Never used: the lowest id, as before any request.
        let fresh = [free_slot(0, 0, 0, 0), free_slot(1, 0, 0, 0)];
        assert_eq!(choose_slot(&fresh).map(|s| s.seq_id), Some(0));
    }

    #[test]
    fn a_sliding_window_prefix_is_reused_only_while_the_window_before_the_cut_is_held() {
        // No window: all but the prompt's last token.
        assert_eq!(usable_prefix(100, 100, 0, None), 99);
        assert_eq!(usable_prefix(40, 100, 0, None), 40);
        // Window 512, every cell still held: any cut works.
        assert_eq!(usable_prefix(900, 1000, 0, Some(512)), 900);
        // Cells from position 300 on: a cut at 900 needs 388.. (by llama-server's rule),
        // a cut at 700 needs 188...
        assert_eq!(usable_prefix(900, 1000, 300, Some(512)), 900);
        assert_eq!(usable_prefix(812, 1000, 300, Some(512)), 812);
        assert_eq!(usable_prefix(811, 1000, 300, Some(512)), 0);
        assert_eq!(usable_prefix(700, 1000, 300, Some(512)), 0);
        // A sequence whose cells are gone (-1) holds nothing.
        assert_eq!(usable_prefix(10, 20, -1, Some(512)), 0);
    }

    #[test]
    fn prompts_get_the_prefill_chunk_only_while_streams_are_generating() {
        // Three streams generating: 128 prompt tokens this step, not the 509 that fit.
        assert_eq!(prompt_chunks(512, 3, 128, &[100, 600]), vec![100, 28]);
        // Nothing generating: no one waits on this step, so prompts take the whole batch.
        assert_eq!(prompt_chunks(512, 0, 128, &[100, 600]), vec![100, 412]);
    }

    #[test]
    fn admission_stops_at_free_slots() {
        assert_eq!(admit_count([(1, 10), (1, 10), (1, 10)], 2, 1_000), 2);
    }

    #[test]
    fn admission_defers_when_kv_cells_would_overflow() {
        assert_eq!(admit_count([(1, 400), (1, 400), (1, 400)], 8, 1_000), 2);
    }

    #[test]
    fn head_of_queue_is_never_overtaken_by_a_smaller_request() {
        assert_eq!(admit_count([(1, 900), (1, 10)], 8, 500), 0);
    }

    #[test]
    fn nothing_waiting_admits_nothing() {
        assert_eq!(admit_count(std::iter::empty(), 8, 1_000), 0);
    }

    #[test]
    fn decode_tokens_come_before_prompt_chunks() {
        assert_eq!(prompt_chunks(8, 6, 512, &[5, 5]), vec![2, 0]);
    }

    #[test]
    fn prompts_fill_the_batch_oldest_first() {
        assert_eq!(
            prompt_chunks(512, 0, 512, &[100, 600, 50]),
            vec![100, 412, 0]
        );
    }

    #[test]
    fn a_full_batch_of_decodes_leaves_no_prompt_budget() {
        assert_eq!(prompt_chunks(4, 4, 512, &[10]), vec![0]);
    }

    // ---- Scheduler -------------------------------------------------------------------

    fn tokens(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().map(|&t| LlamaToken(t)).collect()
    }

    fn limits(slots: u32, total_cells: u32, prefix_cache: bool) -> Limits {
        Limits {
            slots,
            total_cells,
            batch_capacity: 512,
            prefill_chunk: 128,
            prefix_cache,
            sliding_window: None,
        }
    }

    fn request(name: &'static str, prompt: &[i32], max_new_tokens: u32) -> Waiting<&'static str> {
        Waiting {
            prompt: tokens(prompt),
            max_new_tokens,
            payload: name,
            siblings: Vec::new(),
        }
    }

    /// Decodes whatever is planned and samples `token` for every sequence with logits.
    fn step(s: &mut Scheduler<&'static str>, token: i32) -> Vec<Work> {
        let work = s.plan();
        s.decoded(&work);
        for w in &work {
            let seq = &s.live()[w.seq()];
            let has_logits = matches!(w, Work::Decode { .. }) || seq.prompt_left() == 0;
            if has_logits {
                s.sampled(w.seq(), LlamaToken(token));
            }
        }
        work
    }

    #[test]
    fn admission_takes_the_lowest_free_slots_in_arrival_order() {
        let mut s = Scheduler::new(limits(2, 1000, false));
        for name in ["a", "b", "c"] {
            s.enqueue(request(name, &[1, 2, 3], 10));
        }
        let admitted = s.admit();
        assert_eq!(
            admitted.iter().map(|a| a.seq_id).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(s.live()[0].payload, "a");
        assert_eq!(s.live()[1].payload, "b");
        assert_eq!(s.waiting().len(), 1, "c waits for a slot");
        assert_eq!(s.free_slots(), 0);
    }

    #[test]
    fn reservations_hold_cells_until_release() {
        // 100 cells: a (60) fits, b (60) must wait although a slot is free.
        let mut s = Scheduler::new(limits(4, 100, false));
        s.enqueue(request("a", &[1; 10], 50));
        s.enqueue(request("b", &[1; 10], 50));
        assert_eq!(s.admit().len(), 1);
        assert_eq!(s.waiting().len(), 1);
        s.finish(0, FinishReason::Stop);
        let leaving = s.take_leaving(|_| false);
        assert_eq!(leaving.len(), 1);
        assert_eq!(s.release(&leaving[0], 0), Release::Clear(0));
        let admitted = s.admit();
        assert_eq!(admitted.len(), 1, "a's cells came back");
        assert_eq!(admitted[0].seq_id, 0, "and its slot is the lowest again");
    }

    #[test]
    fn a_sequence_prefills_in_chunks_then_generates_until_finished() {
        let mut s = Scheduler::new(Limits {
            batch_capacity: 4,
            ..limits(1, 100, false)
        });
        s.enqueue(request("a", &[1, 2, 3, 4, 5, 6], 3));
        s.admit();
        // Nothing is generating, so the prompt takes the whole batch: 4, then 2.
        assert_eq!(step(&mut s, 9), [Work::Prompt { seq: 0, tokens: 4 }]);
        assert_eq!(s.live()[0].state, SeqState::Prefilling { done: 4 });
        assert_eq!(step(&mut s, 9), [Work::Prompt { seq: 0, tokens: 2 }]);
        assert_eq!(
            s.live()[0].state,
            SeqState::Generating {
                pending: LlamaToken(9)
            }
        );
        assert_eq!(step(&mut s, 8), [Work::Decode { seq: 0 }]);
        let seq = &s.live()[0];
        assert_eq!((seq.n_past, seq.generated), (7, 2));
        assert_eq!(seq.decoded, tokens(&[9]));
        s.finish(0, FinishReason::Length);
        assert!(s.plan().is_empty(), "a finished sequence gets no work");
    }

    #[test]
    fn decodes_come_first_and_the_batch_is_written_in_seq_id_order() {
        let mut s = Scheduler::new(limits(3, 1000, false));
        s.enqueue(request("a", &[1, 2], 10));
        s.enqueue(request("b", &[1, 2], 10));
        s.admit();
        step(&mut s, 5);
        // b leaves; c arrives into slot 1, after a (slot 0) and behind nothing.
        s.finish(1, FinishReason::Stop);
        for seq in s.take_leaving(|_| false) {
            s.release(&seq, 0);
        }
        s.enqueue(request("c", &[7; 300], 10));
        s.admit();
        let work = s.plan();
        assert_eq!(
            work,
            [
                Work::Decode { seq: 0 },
                Work::Prompt {
                    seq: 1,
                    tokens: 128
                }
            ],
            "a decodes; c's prompt is held to the prefill chunk while a generates"
        );
        assert_eq!(s.live()[1].seq_id, 1);
    }

    #[test]
    fn a_client_gone_frees_its_slot_whatever_its_state() {
        let mut s = Scheduler::new(limits(2, 1000, false));
        s.enqueue(request("a", &[1, 2], 10));
        s.enqueue(request("b", &[1, 2], 10));
        s.enqueue(request("c", &[1, 2], 10));
        s.admit();
        assert_eq!(s.drop_waiting(|p| *p == "c"), 1);
        let leaving = s.take_leaving(|p| *p == "a");
        assert_eq!(leaving.len(), 1);
        assert_eq!(s.release(&leaving[0], 0), Release::Clear(0));
        assert_eq!(s.live().len(), 1);
        assert_eq!(s.free_slots(), 1);
        assert!(s.waiting().is_empty());
    }

    #[test]
    fn with_the_prefix_cache_a_finished_sequence_keeps_its_cells_for_the_next_prompt() {
        let mut s = Scheduler::new(limits(2, 1000, true));
        let prompt: Vec<i32> = (1..=20).collect();
        s.enqueue(request("a", &prompt, 2));
        s.admit();
        step(&mut s, 50);
        step(&mut s, 51);
        s.finish(0, FinishReason::Length);
        let leaving = s.take_leaving(|_| false);
        // The cells hold the prompt and the one generated token decoded so far.
        let held: Vec<i32> = prompt.iter().copied().chain([50]).collect();
        assert_eq!(leaving[0].tokens_in_kv(), Some(tokens(&held)));
        assert_eq!(s.release(&leaving[0], 0), Release::Keep(0));

        // A next turn that starts with the same 21 tokens goes back to that slot (not to
        // slot 1, never used) and reuses them all.
        let next: Vec<i32> = held.iter().copied().chain([8, 9]).collect();
        s.enqueue(request("b", &next, 2));
        let admitted = s.admit();
        assert_eq!(
            admitted,
            [Admitted {
                index: 0,
                seq_id: 0,
                reused: 21,
                clear_from: None
            }]
        );
        assert_eq!(s.live()[0].state, SeqState::Prefilling { done: 21 });
        assert_eq!(s.plan(), [Work::Prompt { seq: 0, tokens: 2 }]);
    }

    #[test]
    fn a_prompt_that_diverges_clears_the_cached_cells_past_the_shared_prefix() {
        let mut s = Scheduler::new(limits(1, 1000, true));
        s.enqueue(request("a", &[1, 2, 3, 4], 1));
        s.admit();
        step(&mut s, 5);
        s.finish(0, FinishReason::Length);
        for seq in s.take_leaving(|_| false) {
            s.release(&seq, 0);
        }
        s.enqueue(request("b", &[1, 2, 9], 1));
        let admitted = s.admit();
        assert_eq!(admitted[0].reused, 2);
        assert_eq!(admitted[0].clear_from, Some(2));
        step(&mut s, 5);
        s.finish(0, FinishReason::Stop);
        for seq in s.take_leaving(|_| false) {
            s.release(&seq, 0);
        }
        // A prompt the cells hold whole: one token is still left to prefill, for its logits.
        s.enqueue(request("c", &[1, 2], 1));
        let admitted = s.admit();
        assert_eq!(admitted[0].reused, 1);
        assert_eq!(admitted[0].clear_from, Some(1));
        s.forget_reuse(0);
        assert_eq!(s.live()[0].state, SeqState::Prefilling { done: 0 });
        assert_eq!(s.live()[0].n_past, 0);
    }

    #[test]
    fn a_slot_whose_window_was_overwritten_is_cleared_instead_of_reused() {
        let mut s = Scheduler::new(Limits {
            sliding_window: Some(20),
            ..limits(1, 1000, true)
        });
        let history: Vec<i32> = (1..=40).collect();
        // Runs `prompt` to its first token in the only slot, then releases it with its
        // window's cells holding positions 15.. only.
        let turn = |s: &mut Scheduler<&'static str>, prompt: &[i32]| {
            s.enqueue(request("turn", prompt, 1));
            let admitted = s.admit();
            step(s, 99);
            s.finish(0, FinishReason::Length);
            for seq in s.take_leaving(|_| false) {
                s.release(&seq, 15);
            }
            admitted[0]
        };
        turn(&mut s, &history);
        // Cut at 30: the window before it needs positions 10.., which are gone.
        let diverging: Vec<i32> = history[..30].iter().copied().chain([0, 0]).collect();
        let admitted = turn(&mut s, &diverging);
        assert_eq!((admitted.reused, admitted.clear_from), (0, Some(0)));
        turn(&mut s, &history);
        // Cut at 40, all of it: the window needs 20.., which is held.
        let follow_up: Vec<i32> = history.iter().copied().chain([0]).collect();
        let admitted = turn(&mut s, &follow_up);
        assert_eq!((admitted.reused, admitted.clear_from), (40, None));
    }

    #[test]
    fn a_new_sequence_joins_the_run_of_ids_in_use_unless_a_slot_saves_a_long_prefill() {
        let mut s = Scheduler::new(limits(6, 10_000, true));
        let history: Vec<i32> = (100..170).collect();
        for _ in 0..6 {
            s.enqueue(request("filler", &[1; 20], 1));
        }
        s.admit();
        step(&mut s, 9);
        for index in 0..5 {
            s.finish(index, FinishReason::Stop);
        }
        s.sequence_mut(5).prompt = tokens(&history);
        s.sequence_mut(5).n_past = history.len() as i32;
        s.sequence_mut(5).state = SeqState::Generating {
            pending: LlamaToken(0),
        };
        s.finish(5, FinishReason::Stop);
        for seq in s.take_leaving(|_| false) {
            s.release(&seq, 0);
        }
        // Slots 0-4 hold 20-token prompts of ones, slot 5 a 70-token history. With nothing
        // in use or shared, the oldest prefix is evicted: slot 0's.
        s.enqueue(request("running", &[2; 20], 50));
        assert_eq!(s.admit()[0].seq_id, 0);
        // A new prompt sharing nothing joins the run: slot 1, beside slot 0.
        s.enqueue(request("new", &[3; 20], 5));
        assert_eq!(s.admit()[0].seq_id, 1);
        // The history's next turn saves 70 tokens: more than a new run of ids costs.
        let next: Vec<i32> = history.iter().copied().chain([7, 7]).collect();
        s.enqueue(request("next turn", &next, 5));
        let admitted = s.admit();
        assert_eq!((admitted[0].seq_id, admitted[0].reused), (5, 70));
    }

    #[test]
    fn a_cleared_slot_is_evicted_before_one_holding_a_prefix() {
        let mut s = Scheduler::new(limits(2, 1000, true));
        s.enqueue(request("kept", &[1; 20], 1));
        s.enqueue(request("failed", &[2; 20], 1));
        s.admit();
        let work = s.plan();
        s.decoded(&work);
        s.sampled(0, LlamaToken(9));
        s.finish(0, FinishReason::Stop);
        s.fail(&[Work::Decode { seq: 1 }]);
        let mut leaving = s.take_leaving(|_| false);
        // The failed one leaves last, so its slot is the more recently released.
        leaving.sort_by_key(|seq| seq.seq_id);
        assert_eq!(s.release(&leaving[0], 0), Release::Keep(0));
        assert_eq!(s.release(&leaving[1], 0), Release::Clear(1));
        s.enqueue(request("new", &[3; 20], 1));
        assert_eq!(s.admit()[0].seq_id, 1);
    }

    #[test]
    fn a_failed_sequence_never_leaves_a_prefix_behind() {
        let mut s = Scheduler::new(limits(1, 1000, true));
        s.enqueue(request("a", &[1, 2, 3], 4));
        s.admit();
        let work = s.plan();
        s.fail(&work);
        let leaving = s.take_leaving(|_| false);
        assert_eq!(leaving[0].state, SeqState::Failed);
        assert_eq!(s.release(&leaving[0], 0), Release::Clear(0));
    }

    #[test]
    fn a_full_kv_cache_drops_prompt_chunks_first_then_ends_the_newest_sequence() {
        let mut s = Scheduler::new(limits(3, 1000, false));
        s.enqueue(request("a", &[1], 10));
        s.enqueue(request("b", &[1], 10));
        s.admit();
        step(&mut s, 5);
        s.enqueue(request("c", &[1, 2, 3], 10));
        s.admit();
        let mut work = s.plan();
        assert_eq!(work.len(), 3);
        assert_eq!(s.shrink_for_kv(&mut work), Some(KvShrink::PromptsDeferred));
        assert_eq!(work, [Work::Decode { seq: 0 }, Work::Decode { seq: 1 }]);
        assert_eq!(s.shrink_for_kv(&mut work), Some(KvShrink::EndNewest(1)));
        assert_eq!(work, [Work::Decode { seq: 0 }]);
    }

    #[test]
    fn a_full_kv_cache_with_only_prompts_fails_the_newest_instead_of_retrying_forever() {
        let mut s = Scheduler::new(limits(2, 1000, false));
        s.enqueue(request("a", &[1; 8], 10));
        s.enqueue(request("b", &[1; 8], 10));
        s.admit();
        let mut work = s.plan();
        assert_eq!(s.shrink_for_kv(&mut work), Some(KvShrink::FailNewest(1)));
        assert_eq!(work, [Work::Prompt { seq: 0, tokens: 8 }]);
        assert_eq!(s.shrink_for_kv(&mut work), Some(KvShrink::FailNewest(0)));
        assert!(work.is_empty());
        assert_eq!(s.shrink_for_kv(&mut work), None);
    }

    #[test]
    fn steps_to_release_are_sorted_and_count_the_prompt_left() {
        let mut s = Scheduler::new(limits(2, 1000, false));
        s.enqueue(request("a", &[1; 10], 100));
        s.enqueue(request("b", &[1; 10], 5));
        s.admit();
        // b: 10 prompt tokens at 0.01 s each over 0.05 s steps = 2 steps, then 5 tokens.
        assert_eq!(s.steps_to_release(None, 0.01, 0.05), [7, 102]);
        assert_eq!(s.pending_prompt_tokens(), 20);
    }

    #[test]
    fn a_request_with_choices_takes_a_slot_each_prefills_once_and_forks() {
        let mut s = Scheduler::new(limits(4, 4_000, false));
        let mut group = request("a", &[1, 2, 3], 10);
        group.siblings = vec!["a1", "a2"];
        s.enqueue(group);
        s.enqueue(request("b", &[4, 5], 10));
        // Three slots and 3 x 13 cells for the group, then one slot for b.
        assert_eq!(s.admit().len(), 4);
        assert_eq!(s.free_slots(), 0);
        // Only the leader and b prefill; the forked choices wait for the leader.
        let work = s.plan();
        let prefilled: Vec<&str> = work.iter().map(|w| s.live()[w.seq()].payload).collect();
        assert_eq!(prefilled, ["a", "b"]);
        step(&mut s, 7);
        let leader = s
            .live()
            .iter()
            .position(|q| q.payload == "a")
            .expect("leader");
        let forked = s.fork(leader);
        assert_eq!(forked.len(), 2);
        for &choice in &forked {
            let seq = &s.live()[choice];
            assert_eq!(seq.n_past, 3, "the leader's prompt is in its cells");
            assert_eq!(seq.prompt_left(), 0);
            s.sampled(choice, LlamaToken(8));
        }
        // Next step: every choice decodes its own token.
        let decoding = step(&mut s, 9)
            .iter()
            .filter(|w| matches!(w, Work::Decode { .. }))
            .count();
        assert_eq!(decoding, 4);
    }

    #[test]
    fn choices_whose_leader_left_before_forking_are_orphans() {
        let mut s = Scheduler::new(limits(4, 4_000, false));
        let mut group = request("a", &[1, 2, 3], 10);
        group.siblings = vec!["a1"];
        s.enqueue(group);
        s.admit();
        assert!(s.orphaned_forks().is_empty());
        let leader = s
            .live()
            .iter()
            .position(|q| q.payload == "a")
            .expect("leader");
        s.fail(&[Work::Decode { seq: leader }]);
        let orphans = s.orphaned_forks();
        assert_eq!(orphans.len(), 1);
        assert_eq!(s.live()[orphans[0]].payload, "a1");
        // A group that needs more slots than are free waits, in order.
        let mut big = request("c", &[1], 1);
        big.siblings = vec!["c1", "c2", "c3", "c4"];
        s.enqueue(big);
        assert!(s.admit().is_empty());
    }
}
