//! Continuous-batching policy, kept free of FFI so it can be tested on its own: who is
//! admitted between steps, and how many prompt tokens each step may carry.
//!
//! The step loop in [`super::llama`] asks these functions and carries out the answer.

/// How many of the waiting requests (in arrival order, each given by the KV cells it
/// reserves: prompt plus the most tokens it may generate) can start now.
///
/// Admission is first-come first-served: the head of the queue is never overtaken by a
/// smaller request behind it, so a long prompt cannot starve. A request is admitted only
/// if its whole reservation fits, which is what keeps a full KV cache from ever ending a
/// running sequence early.
pub fn admit_count(
    waiting_reservations: impl IntoIterator<Item = u32>,
    free_slots: usize,
    free_cells: u32,
) -> usize {
    let mut cells_left = free_cells;
    let mut admitted = 0;
    for reservation in waiting_reservations.into_iter().take(free_slots) {
        if reservation > cells_left {
            break;
        }
        cells_left -= reservation;
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

/// Prompt tokens a slot must reuse beyond what the lowest free slot offers before a new
/// sequence goes there instead: batches of consecutive seq ids cost one pass over the
/// weights (see `StepLoop::plan`), and a gap in the ids costs another pass on every step
/// the sequence lives, which only a long saved prefill is worth.
pub const PREFIX_GAIN_FOR_ANOTHER_SLOT: usize = 64;

/// Chooses the slot for a new sequence: the lowest free id, unless another free slot
/// holds a cached prefix at least [`PREFIX_GAIN_FOR_ANOTHER_SLOT`] tokens longer.
/// `free` lists each free slot with the prompt tokens its cache shares, lowest id first.
/// Returns the slot and its shared prefix.
pub fn pick_slot(free: &[(i32, usize)]) -> Option<(i32, usize)> {
    let &lowest = free.first()?;
    let best = free
        .iter()
        .copied()
        .max_by_key(|&(id, shared)| (shared, std::cmp::Reverse(id)))
        .unwrap_or(lowest);
    Some(if best.1 >= lowest.1 + PREFIX_GAIN_FOR_ANOTHER_SLOT {
        best
    } else {
        lowest
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

    #[test]
    fn the_lowest_free_slot_wins_unless_another_saves_a_long_prefill() {
        assert_eq!(pick_slot(&[]), None);
        // Slot 5 shares 40 more tokens than slot 2: not worth a gap in the ids.
        assert_eq!(pick_slot(&[(2, 10), (5, 50)]), Some((2, 10)));
        // Slot 5 shares 100 more: it saves a long prefill.
        assert_eq!(pick_slot(&[(2, 10), (5, 110), (7, 110)]), Some((5, 110)));
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
        assert_eq!(admit_count([10, 10, 10], 2, 1_000), 2);
    }

    #[test]
    fn admission_defers_when_kv_cells_would_overflow() {
        assert_eq!(admit_count([400, 400, 400], 8, 1_000), 2);
    }

    #[test]
    fn head_of_queue_is_never_overtaken_by_a_smaller_request() {
        assert_eq!(admit_count([900, 10], 8, 500), 0);
    }

    #[test]
    fn nothing_waiting_admits_nothing() {
        assert_eq!(admit_count([], 8, 1_000), 0);
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
}
