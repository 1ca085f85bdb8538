//! When a round with one peer is due, and which calls it makes: a state machine with
//! neither a clock (the caller passes `now`, in ms from any origin) nor I/O. The tonic
//! driver sleeps until [`Next::Wait`] and makes the calls; the simulator does the same
//! on simulated time.
//!
//! A push round runs every `sync` ms (or at once when a write asks for it), an
//! anti-entropy round every `anti_entropy` ms (or at once when a full buffer asks for
//! it). A push round to a peer that has not answered yet pulls first, so a restarted
//! replica learns what the peer has before it sends. One round at a time; a failed call
//! ends its round.

/// A call to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Anti-entropy: send our version vector, take what we lack.
    Pull,
    /// Send what the peer lacks.
    Push,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Make this call, then report it with [`Schedule::done`].
    Call(Call),
    /// Nothing until this time (or a wake); `None` while a call is out.
    Wait(Option<u64>),
}

/// One peer's rounds.
#[derive(Debug, Clone)]
pub struct Schedule {
    sync: u64,
    anti_entropy: u64,
    next_sync: u64,
    next_anti_entropy: u64,
    push_wanted: bool,
    anti_entropy_wanted: bool,
    /// Calls left in the current round, the first one possibly out.
    round: Vec<Call>,
    out: bool,
    /// The last round was anti-entropy: when both are due, a push goes next (a pull
    /// slower than the anti-entropy interval must not starve pushes).
    last_pulled: bool,
}

impl Schedule {
    /// A schedule whose first rounds are due at `now`.
    pub fn new(now: u64, sync_ms: u64, anti_entropy_ms: u64) -> Self {
        Self {
            sync: sync_ms.max(1),
            anti_entropy: anti_entropy_ms.max(1),
            next_sync: now,
            next_anti_entropy: now,
            push_wanted: false,
            anti_entropy_wanted: false,
            round: Vec::new(),
            out: false,
            last_pulled: false,
        }
    }

    /// Asks for a push round (a write to push at once) or an anti-entropy round (a full
    /// buffer) as soon as the current round ends.
    pub fn wake(&mut self, push: bool, anti_entropy: bool) {
        self.push_wanted |= push;
        self.anti_entropy_wanted |= anti_entropy;
    }

    /// What to do at `now`. `contacted`: the peer has answered since we started.
    pub fn poll(&mut self, now: u64, contacted: bool) -> Next {
        if self.out {
            return Next::Wait(None);
        }
        if self.round.is_empty() {
            // A wake does not move the timer (as a tokio interval's tick is not moved).
            let pull_due = self.anti_entropy_wanted || now >= self.next_anti_entropy;
            let push_due = self.push_wanted || now >= self.next_sync;
            if pull_due && !(push_due && self.last_pulled) {
                self.last_pulled = true;
                self.anti_entropy_wanted = false;
                if now >= self.next_anti_entropy {
                    self.next_anti_entropy = after(self.next_anti_entropy, self.anti_entropy, now);
                }
                self.round = vec![Call::Pull];
            } else if push_due {
                self.last_pulled = false;
                self.push_wanted = false;
                if now >= self.next_sync {
                    self.next_sync = after(self.next_sync, self.sync, now);
                }
                self.round = if contacted {
                    vec![Call::Push]
                } else {
                    vec![Call::Pull, Call::Push]
                };
            } else {
                return Next::Wait(Some(self.next_sync.min(self.next_anti_entropy)));
            }
        }
        self.out = true;
        Next::Call(self.round[0])
    }

    /// The call given by the last `poll` ended; a failure ends the round.
    pub fn done(&mut self, ok: bool) {
        self.out = false;
        if ok && !self.round.is_empty() {
            self.round.remove(0);
        } else {
            self.round.clear();
        }
    }
}

/// The next tick of a timer due at `due` with `period`, handled at `now`: the next
/// period, or a whole period from now when the tick came late (no burst of missed ticks).
fn after(due: u64, period: u64, now: u64) -> u64 {
    let next = due + period;
    if next > now { next } else { now + period }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_round_pulls_then_pushes_and_later_rounds_only_push() {
        let mut s = Schedule::new(0, 100, 1000);
        // Both timers are due at start: anti-entropy goes first.
        assert_eq!(s.poll(0, false), Next::Call(Call::Pull));
        assert_eq!(s.poll(0, false), Next::Wait(None));
        s.done(true);
        // The push timer is due too; the peer has not answered yet: pull, then push.
        assert_eq!(s.poll(0, false), Next::Call(Call::Pull));
        s.done(true);
        assert_eq!(s.poll(0, true), Next::Call(Call::Push));
        s.done(true);
        assert_eq!(s.poll(1, true), Next::Wait(Some(100)));
        assert_eq!(s.poll(100, true), Next::Call(Call::Push));
        s.done(true);
        assert_eq!(s.poll(150, true), Next::Wait(Some(200)));
    }

    #[test]
    fn a_failed_call_ends_its_round() {
        let mut s = Schedule::new(0, 100, 1000);
        assert_eq!(s.poll(0, false), Next::Call(Call::Pull));
        s.done(true);
        assert_eq!(s.poll(0, false), Next::Call(Call::Pull));
        s.done(false);
        // The push of that round is dropped; the next push round is the timer's.
        assert_eq!(s.poll(10, false), Next::Wait(Some(100)));
    }

    #[test]
    fn a_pull_slower_than_the_anti_entropy_interval_does_not_starve_pushes() {
        let mut s = Schedule::new(0, 100, 1000);
        s.poll(0, true);
        s.done(true);
        s.poll(0, true);
        s.done(true);
        // Every pull takes 1.5 s: anti-entropy is due again whenever one ends, and so
        // is the push; they take turns.
        let mut now = 1000;
        let mut calls = Vec::new();
        for _ in 0..6 {
            let Next::Call(c) = s.poll(now, true) else {
                panic!("a round is due at {now}");
            };
            calls.push(c);
            now += if c == Call::Pull { 1500 } else { 1 };
            s.done(true);
        }
        assert_eq!(
            calls,
            [
                Call::Pull,
                Call::Push,
                Call::Pull,
                Call::Push,
                Call::Pull,
                Call::Push
            ]
        );
    }

    #[test]
    fn a_late_tick_does_not_burst() {
        let mut s = Schedule::new(0, 100, 10_000);
        s.poll(0, true);
        s.done(true);
        s.poll(0, true);
        s.done(true);
        // The round at 0 took until 550 (a slow peer): one push now, the next at 650.
        assert_eq!(s.poll(550, true), Next::Call(Call::Push));
        s.done(true);
        assert_eq!(s.poll(551, true), Next::Wait(Some(650)));
    }

    #[test]
    fn wakes_start_a_round_at_once_and_anti_entropy_first() {
        let mut s = Schedule::new(0, 100, 1000);
        s.poll(0, true);
        s.done(true);
        s.poll(0, true);
        s.done(true);
        s.wake(true, true);
        assert_eq!(s.poll(5, true), Next::Call(Call::Pull));
        s.done(true);
        assert_eq!(s.poll(5, true), Next::Call(Call::Push));
        s.done(true);
        assert_eq!(s.poll(6, true), Next::Wait(Some(100)));
    }
}
