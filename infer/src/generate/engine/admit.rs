//! Admission: waiting requests become units in free slots, their prompts prefilled.
use tch::Tensor;

use super::{Engine, Generated, Kind, Unit, PREFILL_CHUNK, RIDE_ALONG_MAX};
use crate::error::Result;
use crate::generate::beam::Beam;
use crate::generate::FinishReason;
use crate::rng::SeqRng;

impl Engine<'_> {
    /// Admits waiting units into free slots (all of them that fit, or with static
    /// batches only when nothing runs) and prefills their prompts.
    pub(super) fn admit(&mut self) -> Result<()> {
        if self.steps > 0 && self.timed_out() {
            // --max-time has passed (after at least one step, as for a running
            // sequence): what has not started never will.
            for u in std::mem::take(&mut self.waiting) {
                let (request, j) = (u / self.per_request, u % self.per_request);
                let n = if self.beams > 1 {
                    self.done[request].len()
                } else {
                    1
                };
                for slot in self.done[request].iter_mut().skip(j).take(n) {
                    *slot = Some(Generated::empty(FinishReason::Time));
                }
            }
            return Ok(());
        }
        if self.schedule.static_batches && !self.live.is_empty() {
            return Ok(());
        }
        let mut joined = Vec::new();
        while let Some(&u) = self.waiting.front() {
            if self.free.len() < self.beams {
                break;
            }
            self.waiting.pop_front();
            let slots: Vec<usize> = (0..self.beams).filter_map(|_| self.free.pop()).collect();
            let unit = self.unit(u, slots)?;
            // The first model runs the request's adapter, if it names one.
            if let Some(a) = self.requests[unit.request].adapter {
                for &s in &unit.slots {
                    self.caches[0].set_adapter(s, Some(a));
                }
            }
            if self.rides_along(&unit, joined.len()) {
                self.feeding.push((unit, 0));
            } else {
                joined.push(unit);
            }
        }
        if self.spec.is_none() {
            // A speculating sequence's first round feeds its prompt (`speculate`).
            self.prefill(&mut joined)?;
        }
        self.live.extend(joined);
        Ok(())
    }

    /// Whether `u`'s prompt rides along the decode steps (`RIDE_ALONG_MAX`) instead of a
    /// pass of its own: a short prompt of one sequence, while others decode and the step
    /// stays on the CPU kernels (which compute each row the same in any batch, so the
    /// sequence gets exactly the tokens of its prompt prefilled alone).
    fn rides_along(&self, u: &Unit, also_joining: usize) -> bool {
        let rows =
            self.live.iter().map(Unit::rows).sum::<usize>() + self.feeding.len() + also_joining + 1;
        !self.live.is_empty()
            && self.spec.is_none()
            && self.per_request == 1
            && matches!(u.kind, Kind::One { .. })
            && u.prompt_len <= RIDE_ALONG_MAX
            && self
                .models
                .models
                .iter()
                .all(|m| m.decodes_on_kernels(rows))
    }

    /// Unit `u` (request `u / per_request`) in `slots`, not yet prefilled.
    fn unit(&self, u: usize, slots: Vec<usize>) -> Result<Unit> {
        let request = u / self.per_request;
        let req = &self.requests[request];
        let row = u;
        // Output row k draws from seed + k; a beam group (one unit per request) from its
        // first row's, request × num_return_sequences.
        let k = if self.beams > 1 {
            request * self.cfg.num_return_sequences
        } else {
            row
        };
        // A request with its own settings draws from its own seed.
        let (cfg, k) = match &req.settings {
            Some(own) => (&**own, 0),
            None => (self.cfg, k),
        };
        let rng = match cfg.seed {
            Some(seed) if cfg.processing.do_sample => {
                Some(SeqRng::seeded(seed.wrapping_add(k as u64), self.device)?)
            }
            _ => None,
        };
        let kind = if self.beams > 1 {
            let mut cfg = self.cfg.clone();
            cfg.max_new_tokens = req.max_new_tokens;
            cfg.max_length = None;
            let beam = Beam::new(std::slice::from_ref(&req.prompt), &cfg);
            Kind::Beams(Box::new(beam), Box::new(cfg))
        } else {
            Kind::One {
                tokens: req.prompt.clone(),
                out: Generated::empty(FinishReason::Length),
            }
        };
        Ok(Unit {
            request,
            row,
            prompt_len: req.prompt.len(),
            limit: req.max_new_tokens,
            settings: req.settings.clone(),
            slots,
            hidden: Vec::new(),
            rng,
            kind,
        })
    }

    /// Prefills the joined units: each distinct request once (the prompts of one length
    /// together, in chunks), then copied to its other units' and beams' slots.
    fn prefill(&mut self, joined: &mut [Unit]) -> Result<()> {
        // The first unit of each request among the joined does the forward pass.
        let mut firsts: Vec<usize> = Vec::new();
        for (i, u) in joined.iter().enumerate() {
            if !firsts.iter().any(|&f| joined[f].request == u.request) {
                firsts.push(i);
            }
        }
        // Prompts of one length share a pass while it stays on the decode kernels (which
        // compute each row the same beside any others); past that libtorch would round a
        // row differently than alone, so each goes on its own. A piece of at most
        // `MAX_ROWS` tokens runs as a fused step (each token a row), which rounds
        // differently from a longer pass: a group keeps every piece on the path its
        // prompt's pieces take alone.
        let models = &self.models.models;
        let on_kernels = |tokens: usize| models.iter().all(|m| m.prefills_on_kernels(tokens));
        let fused = |tokens: usize| tokens <= crate::kernels::MAX_ROWS;
        let shares = |prompts: usize, n: usize| {
            let last = match n % PREFILL_CHUNK {
                0 => PREFILL_CHUNK.min(n),
                r => r,
            };
            [n.min(PREFILL_CHUNK), last]
                .iter()
                .all(|&t| on_kernels(prompts * t) && fused(prompts * t) == fused(t))
        };
        // Where a first prompt's prefix is cached, its slot starts with it.
        let starts: Vec<usize> = firsts
            .iter()
            .map(|&f| self.reuse_prefix(&joined[f]))
            .collect();
        let mut by_len: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (&f, &from) in firsts.iter().zip(&starts) {
            let key = (from, joined[f].prompt_len);
            let open = by_len
                .iter_mut()
                .find(|(k, group)| *k == key && shares(group.len() + 1, key.1 - from));
            match open {
                Some((_, group)) => group.push(f),
                None => by_len.push((key, vec![f])),
            }
        }
        for ((from, len), group) in by_len {
            let rows: Vec<usize> = group.iter().map(|&f| joined[f].slots[0]).collect();
            let ids: Vec<i64> = group
                .iter()
                .flat_map(|&f| {
                    self.requests[joined[f].request].prompt[from..]
                        .iter()
                        .copied()
                })
                .collect();
            let ids = Tensor::from_slice(&ids)
                .view([group.len() as i64, (len - from) as i64])
                .to_device(self.device);
            let tokens = group.len() * (len - from).min(PREFILL_CHUNK);
            self.threads.one(on_kernels(tokens));
            for (m, (model, cache)) in self.models.models.iter().zip(&mut self.caches).enumerate() {
                let mut h = None;
                for start in (0..len - from).step_by(PREFILL_CHUNK) {
                    let t = PREFILL_CHUNK.min(len - from - start) as i64;
                    let span = cache.span(Some(&rows), t).map_err(crate::Error::Input)?;
                    let piece = ids.narrow(1, start as i64, t);
                    h = Some(model.forward_span(&piece, cache, &span));
                }
                let h = h.expect("prompts are not empty").select(1, -1); // (G, E)
                for (i, &f) in group.iter().enumerate() {
                    let hidden = &mut joined[f].hidden;
                    hidden.resize_with(m + 1, Tensor::new);
                    hidden[m] = h.narrow(0, i as i64, 1);
                }
            }
        }
        for &f in &firsts {
            self.keep_prefix(&joined[f]);
        }
        // The other units of a request, and every beam, copy the first's slot.
        for i in 0..joined.len() {
            let f = firsts
                .iter()
                .copied()
                .find(|&f| joined[f].request == joined[i].request)
                .expect("every request has a first");
            let from = joined[f].slots[0];
            let hidden: Vec<Tensor> = joined[f].hidden.iter().map(|h| h.shallow_clone()).collect();
            let u = &mut joined[i];
            for cache in &mut self.caches {
                for &to in &u.slots {
                    if to != from {
                        cache.copy_row(from, to);
                    }
                }
            }
            let rows = u.rows() as i64;
            u.hidden = hidden
                .iter()
                .map(|h| h.expand([rows, h.size()[1]], false).contiguous())
                .collect();
        }
        Ok(())
    }

    /// With a prefix cache, writes the longest cached prefix of `u`'s prompt into its slot
    /// (in every model's cache); how many prompt tokens that leaves unfed. Beams and
    /// speculative decoding always prefill the whole prompt.
    fn reuse_prefix(&mut self, u: &Unit) -> usize {
        let Some(cache) = &self.prefix else {
            return 0;
        };
        if !matches!(u.kind, Kind::One { .. }) {
            return 0;
        }
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let prompt = &self.requests[u.request].prompt;
        let adapter = self.caches[0].adapter(u.slots[0]);
        let Some((n, kv)) = cache.lookup(adapter, prompt) else {
            return 0;
        };
        let written = self
            .caches
            .iter_mut()
            .zip(kv)
            .all(|(c, kv)| c.write_prefix(u.slots[0], kv, n as i64).is_ok());
        if written {
            n
        } else {
            // A layout that does not fit (not expected: one engine, one model set) is a
            // miss; the slot is emptied and the whole prompt prefilled.
            for c in &mut self.caches {
                c.free_row(u.slots[0]);
            }
            0
        }
    }

    /// With a prefix cache, keeps `u`'s prompt's keys and values (just prefilled).
    fn keep_prefix(&mut self, u: &Unit) {
        let Some(cache) = &self.prefix else {
            return;
        };
        if !matches!(u.kind, Kind::One { .. }) {
            return;
        }
        let prompt = &self.requests[u.request].prompt;
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let adapter = self.caches[0].adapter(u.slots[0]);
        if cache.wants(adapter, prompt) {
            let n = prompt.len() as i64;
            let kv = self
                .caches
                .iter_mut()
                .map(|c| c.read_prefix(u.slots[0], n))
                .collect();
            cache.insert(adapter, prompt.clone(), kv);
        }
    }
}
