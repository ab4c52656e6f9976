//! How many writes of a layer are in flight at once, across every reconcile: a limit that adapts to
//! what the API server does with them.
//!
//! The limit starts at `--write-concurrency` and moves between 1 and `--write-concurrency-max`:
//! - It is measured in windows of completed writes. A window's throughput is its mean number of writes
//!   in flight over its mean write latency (Little's law). That is what the limit buys while writes are
//!   waiting, whatever else the reconciles do between writes. A window in which the writes did not fill
//!   the limit says nothing about it and is measured again.
//! - Another limit is tried against the kept one in a paired trial: windows alternate between the two
//!   (kept, other, three times), so that what else loads the API server meanwhile (the workloads'
//!   own controllers rolling out what was written, most of all) weighs on both alike.
//! - Half as many again is kept when it writes more than [`BETTER`] times as much; then more is
//!   tried. When it does not, a third less is tried, and kept when it writes at least [`SAME`] of the
//!   kept limit's throughput: the API server is shared, and crosstrace takes no more of it than it
//!   gets something for. Once neither is better, the limit stays for [`HOLD`] windows and tries again.
//! - An answer that says the API server is overloaded (429, 503, 504, once the client's own retries
//!   gave up) halves it at once. Only once for the writes that were in flight together: their answers
//!   say the same thing. The retries before it count in the write's latency, so they already lower
//!   the measured throughput.
//!
//! With `--write-concurrency-max` equal to `--write-concurrency`, the limit is fixed: it moves for
//! nothing (the client still waits as a 429's `Retry-After` asks).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A higher limit is kept when it writes more than this many times as much.
pub const BETTER: f64 = 1.05;
/// A lower limit is kept when it writes at least this share of what the kept one writes.
pub const SAME: f64 = 0.95;
/// Windows the limit stays at once no other was better, or after an overload.
pub const HOLD: u32 = 8;
/// Windows of a trial: the kept limit and the other one, three times each.
const TRIAL: u8 = 6;
/// The fewest writes a window has.
const MIN_WINDOW: u32 = 32;
/// A window is measured again when its writes filled less than this share of the limit.
const FILLED: f64 = 0.75;
/// A window whose last write is longer ago than this is dropped, and a trial starts over: they
/// measured another moment.
const STALE: Duration = Duration::from_secs(2);

/// The adaptive limit of one layer's writes; shared by every reconcile.
#[derive(Debug)]
pub struct WriteLimit {
    /// Shows the limit (the layer's `crosstrace_write_limit`), when it is exported.
    gauge: Option<(&'static str, prometheus_client::metrics::gauge::Gauge)>,
    floor: usize,
    ceiling: usize,
    state: Mutex<State>,
    room: Notify,
}

#[derive(Debug)]
struct State {
    /// The limit writes start under now: the kept one, or a trial's other while a window tries it.
    limit: usize,
    /// The limit kept.
    kept: usize,
    in_flight: usize,
    /// Moves on with every change of `limit`: a write is measured against the limit it started under.
    epoch: u64,
    window: Sum,
    step: Step,
    /// When the last write was measured.
    last: Option<Instant>,
}

/// Writes measured together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sum {
    writes: u32,
    /// The writes in flight when each started, summed.
    in_flight: f64,
    /// Their latencies, summed.
    seconds: f64,
}

impl Sum {
    fn add(&mut self, other: Sum) {
        self.writes += other.writes;
        self.in_flight += other.in_flight;
        self.seconds += other.seconds;
    }

    /// Writes per second with this many in flight (mean in flight over mean latency).
    fn throughput(&self) -> f64 {
        if self.seconds > 0.0 { self.in_flight / self.seconds } else { 0.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Staying at the kept limit for this many more windows, then trying more.
    Hold(u32),
    /// Trying `other` against the kept limit: the `window`th of [`TRIAL`] (even: kept, odd: other).
    Trial { other: usize, window: u8, kept: Sum, tried: Sum },
}

/// What a finished write tells the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered (success or an ordinary refusal, e.g. a conflict): its latency is measured.
    Answered,
    /// The API server is overloaded (429, 503, 504).
    Overloaded,
}

impl Answer {
    /// What a write's result says of the API server's load.
    pub fn of<T>(result: &super::apply::Result<T>) -> Self {
        match result {
            Err(super::apply::Error::Kube(kube::Error::Api(status))) if [429, 503, 504].contains(&status.code) => {
                Self::Overloaded
            }
            _ => Self::Answered,
        }
    }
}

/// A write in flight; its place is given back when it is dropped (also when the write is abandoned).
#[derive(Debug)]
pub struct Permit {
    limit: Arc<WriteLimit>,
    started: Instant,
    in_flight: usize,
    epoch: u64,
}

impl Permit {
    /// The write ended with `answer`: the limit takes it in.
    pub fn finish(self, answer: Answer) {
        self.limit.took(&self, answer, Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limit.lock();
        state.in_flight -= 1;
        drop(state);
        self.limit.room.notify_waiters();
    }
}

impl WriteLimit {
    /// Starts at `start` and adapts between 1 and `ceiling`; a `ceiling` not above `start` fixes it.
    pub fn new(start: usize, ceiling: usize) -> Self {
        let start = start.max(1);
        let fixed = ceiling <= start;
        Self {
            gauge: None,
            floor: if fixed { start } else { 1 },
            ceiling: ceiling.max(start),
            state: Mutex::new(State {
                limit: start,
                kept: start,
                in_flight: 0,
                epoch: 0,
                window: Sum::default(),
                step: Step::Hold(1),
                last: None,
            }),
            room: Notify::new(),
        }
    }

    /// Shows the limit in `gauge` (and its moves in the debug log), as the limit of `layer`'s writes.
    pub fn shown_in(mut self, layer: &'static str, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(i64::try_from(self.limit()).unwrap_or(i64::MAX));
        self.gauge = Some((layer, gauge));
        self
    }

    /// Always `n`.
    pub fn fixed(n: usize) -> Self {
        Self::new(n, n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many writes may be in flight now.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// The limit kept (what [`WriteLimit::limit`] is outside a trial's windows).
    pub fn kept(&self) -> usize {
        self.lock().kept
    }

    /// A place for one more write, if the limit has room now.
    pub fn try_start(self: &Arc<Self>) -> Option<Permit> {
        let mut state = self.lock();
        (state.in_flight < state.limit).then(|| {
            state.in_flight += 1;
            Permit { limit: Arc::clone(self), started: Instant::now(), in_flight: state.in_flight, epoch: state.epoch }
        })
    }

    /// Resolves once a write ends or the limit goes up (possibly spuriously): then there may be room.
    /// Create it before [`WriteLimit::try_start`] fails, so that no ending is missed in between.
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    fn took(&self, permit: &Permit, answer: Answer, now: Instant) {
        let mut state = self.lock();
        let (limit_before, kept_before) = (state.limit, state.kept);
        if state.epoch == permit.epoch && self.floor < self.ceiling {
            state.take(permit, answer, now, (self.floor, self.ceiling));
        }
        let (limit, kept, step) = (state.limit, state.kept, state.step);
        drop(state);
        if let Some((layer, gauge)) = self.gauge.as_ref().filter(|_| kept != kept_before) {
            gauge.set(i64::try_from(kept).unwrap_or(i64::MAX));
            tracing::debug!(layer, kept, before = kept_before, ?answer, ?step, "write limit");
        }
        if limit > limit_before {
            self.room.notify_waiters();
        }
    }
}

impl State {
    /// Takes in one finished write, started under the current limit.
    fn take(&mut self, permit: &Permit, answer: Answer, now: Instant, (floor, ceiling): (usize, usize)) {
        if answer == Answer::Overloaded {
            self.kept = (self.limit.min(self.kept) / 2).max(floor);
            self.step = Step::Hold(HOLD);
            self.start(self.kept);
            return;
        }
        if self.last.is_some_and(|last| now.duration_since(last) > STALE) {
            self.window = Sum::default();
            if let Step::Trial { other, .. } = self.step {
                self.step = Step::Trial { other, window: 0, kept: Sum::default(), tried: Sum::default() };
                self.start(self.kept);
            }
        }
        self.last = Some(now);
        self.window.add(Sum {
            writes: 1,
            in_flight: permit.in_flight as f64,
            seconds: now.duration_since(permit.started).as_secs_f64(),
        });
        let size = (2 * u32::try_from(self.limit).unwrap_or(u32::MAX)).max(MIN_WINDOW);
        if self.window.writes < size {
            return;
        }
        let window = std::mem::take(&mut self.window);
        if window.in_flight / f64::from(window.writes) < FILLED * self.limit as f64 {
            return;
        }
        self.next(window, floor, ceiling);
    }

    /// Where the limit goes after a full window.
    fn next(&mut self, window: Sum, floor: usize, ceiling: usize) {
        let up = |n: usize| (n + (n / 2).max(1)).min(ceiling);
        let down = |n: usize| (n - n / 3).max(floor);
        let trial = |other: usize| Step::Trial { other, window: 0, kept: Sum::default(), tried: Sum::default() };
        // What to try from `kept`: more, else fewer, else nothing for a while.
        let try_more = |kept: usize| {
            if up(kept) > kept {
                trial(up(kept))
            } else if down(kept) < kept {
                trial(down(kept))
            } else {
                Step::Hold(HOLD)
            }
        };
        self.step = match self.step {
            Step::Hold(n) if n > 1 => Step::Hold(n - 1),
            Step::Hold(_) => try_more(self.kept),
            Step::Trial { other, window: n, mut kept, mut tried } => {
                if n % 2 == 0 {
                    kept.add(window);
                } else {
                    tried.add(window);
                }
                if n + 1 < TRIAL {
                    Step::Trial { other, window: n + 1, kept, tried }
                } else if other > self.kept && tried.throughput() > kept.throughput() * BETTER {
                    self.kept = other;
                    if up(other) > other { trial(up(other)) } else { Step::Hold(HOLD) }
                } else if other > self.kept && down(self.kept) < self.kept {
                    trial(down(self.kept))
                } else if other < self.kept && tried.throughput() >= kept.throughput() * SAME {
                    self.kept = other;
                    if down(other) < other { trial(down(other)) } else { Step::Hold(HOLD) }
                } else {
                    Step::Hold(HOLD)
                }
            }
        };
        let limit = match self.step {
            Step::Trial { other, window, .. } if window % 2 == 1 => other,
            _ => self.kept,
        };
        self.start(limit);
    }

    /// Writes start under `limit` from now on.
    fn start(&mut self, limit: usize) {
        if limit != self.limit {
            self.limit = limit;
            self.epoch += 1;
            self.window = Sum::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Runs whole windows through `limit`, the limit filled and each write taking `latency(limit)`
    /// seconds; returns the limit each window ran at, and the limit kept after it.
    fn drive(limit: &Arc<WriteLimit>, windows: usize, latency: impl Fn(usize) -> f64) -> Vec<(usize, usize)> {
        let mut seen = vec![];
        let mut now = Instant::now();
        for _ in 0..windows {
            let n = limit.limit();
            let took = Duration::from_secs_f64(latency(n));
            for _ in 0..(2 * n).max(MIN_WINDOW as usize) {
                let mut permit = limit.try_start().expect("room up to the limit");
                (permit.started, permit.in_flight) = (now, n);
                now += took / u32::try_from(n).unwrap();
                limit.took(&permit, Answer::Answered, permit.started + took);
            }
            seen.push((n, limit.kept()));
        }
        seen
    }

    /// The limits kept, each once, in order.
    fn kept(path: &[(usize, usize)]) -> Vec<usize> {
        let mut kept: Vec<usize> = path.iter().map(|(_, k)| *k).collect();
        kept.dedup();
        kept
    }

    #[test]
    fn the_limit_climbs_while_more_in_flight_writes_more_per_second_and_stays_where_it_no_longer_does() {
        // Throughput grows up to 24 in flight and is flat beyond: latency grows with the limit there.
        let limit = Arc::new(WriteLimit::new(8, 64));
        let path = drive(&limit, 80, |n| n.max(24) as f64 / 1000.0);
        assert_eq!(kept(&path), [8, 12, 18, 27], "{path:?}");
        let tried: BTreeSet<usize> = path.iter().skip_while(|(_, k)| *k != 27).map(|(n, _)| *n).collect();
        assert_eq!(tried, BTreeSet::from([18, 27, 40]), "only trials around the knee: {path:?}");
        let at_27 = path.iter().filter(|(n, _)| *n == 27).count();
        assert!(at_27 * 2 > path.len(), "most windows at the knee: {path:?}");
    }

    #[test]
    fn the_limit_never_leaves_its_bounds_and_a_fixed_one_never_moves() {
        let limit = Arc::new(WriteLimit::new(8, 32));
        let path = drive(&limit, 40, |_| 0.01);
        assert!(path.iter().all(|(n, k)| (1..=32).contains(n) && (1..=32).contains(k)), "{path:?}");
        assert_eq!(kept(&path), [8, 12, 18, 27, 32], "latency flat: more in flight is always better: {path:?}");
        let fixed = Arc::new(WriteLimit::fixed(8));
        assert!(drive(&fixed, 20, |n| 0.001 * n as f64).iter().all(|(n, k)| (*n, *k) == (8, 8)));
        fixed.try_start().expect("room").finish(Answer::Overloaded);
        assert_eq!(fixed.limit(), 8, "fixed means fixed, overloaded or not");
    }

    #[test]
    fn fewer_in_flight_is_kept_when_it_writes_as_much() {
        // Every write is serialized by the server: throughput is the same at any limit.
        let limit = Arc::new(WriteLimit::new(16, 64));
        let path = drive(&limit, 60, |n| 0.01 * n as f64);
        assert_eq!(kept(&path), [16, 11, 8, 6, 4, 3, 2], "the limit gives back what buys nothing: {path:?}");
    }

    #[test]
    fn a_trial_pairs_its_windows_so_that_load_growing_meanwhile_weighs_on_both() {
        // Every write takes longer than the one before, whatever the limit (others' load grows), and
        // more in flight writes more: compared with the kept limit's earlier windows alone, the
        // trial would look worse.
        let limit = Arc::new(WriteLimit::new(8, 32));
        let mut now = Instant::now();
        let mut slower = 0.01;
        for _ in 0..12 {
            let n = limit.limit();
            for _ in 0..(2 * n).max(MIN_WINDOW as usize) {
                slower *= 1.004;
                let took = Duration::from_secs_f64(slower * (n as f64).sqrt());
                let mut permit = limit.try_start().expect("room");
                (permit.started, permit.in_flight) = (now, n);
                now += took / u32::try_from(n).unwrap();
                limit.took(&permit, Answer::Answered, permit.started + took);
            }
        }
        assert!(limit.kept() > 8, "{:?}", limit.lock());
    }

    #[test]
    fn an_overloaded_answer_halves_the_limit_once_for_the_writes_in_flight_together() {
        let limit = Arc::new(WriteLimit::new(16, 32));
        let permits: Vec<_> = (0..16).map(|_| limit.try_start().expect("room")).collect();
        let mut permits = permits.into_iter();
        permits.next().unwrap().finish(Answer::Overloaded);
        assert_eq!((limit.limit(), limit.kept()), (8, 8));
        for permit in permits {
            permit.finish(Answer::Overloaded);
        }
        assert_eq!(limit.limit(), 8, "the others were in flight with the first: the same news");
        let permit = limit.try_start().expect("room once they ended");
        permit.finish(Answer::Overloaded);
        assert_eq!(limit.limit(), 4, "a write started after the cut, overloaded too");
        for _ in 0..5 {
            limit.try_start().expect("room").finish(Answer::Overloaded);
        }
        assert_eq!(limit.limit(), 1, "never below 1");
    }

    #[test]
    fn an_abandoned_write_gives_its_place_back_and_a_half_filled_window_is_not_measured() {
        let limit = Arc::new(WriteLimit::new(4, 64));
        let permit = limit.try_start().expect("room");
        let _others: Vec<_> = (0..3).map(|_| limit.try_start().expect("room")).collect();
        assert!(limit.try_start().is_none());
        drop(permit);
        assert!(limit.try_start().is_some(), "the abandoned write's place is free again");
        // One write at a time, far under the limit: whatever its latency, the limit stays.
        let idle = Arc::new(WriteLimit::new(8, 64));
        for _ in 0..100 {
            idle.try_start().expect("room").finish(Answer::Answered);
        }
        assert_eq!((idle.limit(), idle.kept()), (8, 8));
    }
}
