//! How many writes of a layer are in flight at once, across every reconcile: a limit that adapts to
//! what the API server does with them.
//!
//! The limit starts at `--write-concurrency` and moves between 1 and `--write-concurrency-max`:
//! - It is measured in windows of completed writes. A window's throughput is its mean number of writes
//!   in flight over its mean write latency (Little's law). That is what the limit buys while writes are
//!   waiting, whatever else the reconciles do between writes. A window in which the writes did not fill
//!   the limit says nothing about it and is dropped.
//! - It goes up by half while that makes the throughput better by more than [`BETTER`]. When it does
//!   not, the limit goes back and tries a third less. Fewer writes in flight are kept when they give at
//!   least [`SAME`] of the throughput: the API server is shared, and crosstrace takes no more of it
//!   than it gets something for. Then it stays for [`HOLD`] windows and measures again.
//! - An answer that says the API server is overloaded (429, 503, 504, once the client's own retries
//!   gave up) halves it at once. Only once for the writes that were in flight together: their answers
//!   say the same thing. The retries before it count in the write's latency, so they already lower
//!   the measured throughput.
//!
//! With `--write-concurrency-max` equal to `--write-concurrency`, the limit is fixed: it moves for
//! nothing (the client still waits as a 429's `Retry-After` asks).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A higher limit is kept when it makes the throughput better by more than this.
pub const BETTER: f64 = 1.05;
/// A lower limit is kept when it keeps at least this much of the throughput.
pub const SAME: f64 = 0.95;
/// Windows the limit stays at after a probe found nothing better, or after an overload.
pub const HOLD: u32 = 8;
/// The fewest writes a window has.
const MIN_WINDOW: u32 = 16;
/// A window is dropped when its writes filled less than this share of the limit.
const FILLED: f64 = 0.75;
/// A window whose last write is longer ago than this is dropped: it measured another moment.
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
    limit: usize,
    in_flight: usize,
    /// Moves on with every change of the limit: a write is measured against the limit it started under.
    epoch: u64,
    window: Window,
    step: Step,
}

#[derive(Debug, Default)]
struct Window {
    writes: u32,
    in_flight: f64,
    seconds: f64,
    last: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Measuring the current limit, to try a higher one next.
    Measure,
    /// Trying the current limit against `from`, measured at `throughput` (writes per second).
    Probe { from: usize, throughput: f64 },
    /// Staying at the current limit for this many more windows.
    Hold(u32),
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
pub struct Permit<'a> {
    limit: &'a WriteLimit,
    started: Instant,
    in_flight: usize,
    epoch: u64,
}

impl Permit<'_> {
    /// The write ended with `answer`: the limit takes it in.
    pub fn finish(self, answer: Answer) {
        self.limit.took(&self, answer, Instant::now());
    }
}

impl Drop for Permit<'_> {
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
                in_flight: 0,
                epoch: 0,
                window: Window::default(),
                step: Step::Measure,
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

    /// A place for one more write, if the limit has room now.
    pub fn try_start(&self) -> Option<Permit<'_>> {
        let mut state = self.lock();
        (state.in_flight < state.limit).then(|| {
            state.in_flight += 1;
            Permit { limit: self, started: Instant::now(), in_flight: state.in_flight, epoch: state.epoch }
        })
    }

    /// Resolves once a write ends or the limit goes up (possibly spuriously): then there may be room.
    /// Create it before [`WriteLimit::try_start`] fails, so that no ending is missed in between.
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    fn took(&self, permit: &Permit<'_>, answer: Answer, now: Instant) {
        let mut state = self.lock();
        let before = state.limit;
        state.take(permit, answer, now, (self.floor, self.ceiling));
        let (limit, step) = (state.limit, state.step);
        drop(state);
        if limit == before {
            return;
        }
        if let Some((layer, gauge)) = &self.gauge {
            gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
            tracing::debug!(layer, limit, before, ?answer, ?step, "write limit");
        }
        if limit > before {
            self.room.notify_waiters();
        }
    }
}

impl State {
    /// Takes in one finished write.
    fn take(&mut self, permit: &Permit<'_>, answer: Answer, now: Instant, bounds: (usize, usize)) {
        if permit.epoch != self.epoch || bounds.0 == bounds.1 {
            return;
        }
        if answer == Answer::Overloaded {
            let halved = (self.limit / 2).max(bounds.0);
            self.set(halved, Step::Hold(HOLD));
            return;
        }
        if self.window.last.is_some_and(|last| now.duration_since(last) > STALE) {
            self.window = Window::default();
        }
        let window = &mut self.window;
        window.writes += 1;
        window.in_flight += permit.in_flight as f64;
        window.seconds += now.duration_since(permit.started).as_secs_f64();
        window.last = Some(now);
        let size = (2 * u32::try_from(self.limit).unwrap_or(u32::MAX)).max(MIN_WINDOW);
        if window.writes < size {
            return;
        }
        let writes = f64::from(window.writes);
        let (in_flight, latency) = (window.in_flight / writes, window.seconds / writes);
        self.window = Window::default();
        if in_flight < FILLED * self.limit as f64 || latency <= 0.0 {
            return;
        }
        self.next(in_flight / latency, bounds);
    }

    /// Where the limit goes after a window measured `throughput` at it.
    fn next(&mut self, throughput: f64, (floor, ceiling): (usize, usize)) {
        let limit = self.limit;
        let up = (limit + (limit / 2).max(1)).min(ceiling);
        let down = (limit - limit / 3).max(floor);
        match self.step {
            Step::Hold(n) if n > 1 => self.step = Step::Hold(n - 1),
            Step::Hold(_) | Step::Measure => {
                if up > limit {
                    self.set(up, Step::Probe { from: limit, throughput });
                } else if down < limit {
                    self.set(down, Step::Probe { from: limit, throughput });
                } else {
                    self.step = Step::Hold(HOLD);
                }
            }
            Step::Probe { from, throughput: was } if limit > from => {
                if throughput > was * BETTER && up > limit {
                    self.set(up, Step::Probe { from: limit, throughput });
                } else if throughput > was * BETTER {
                    self.step = Step::Hold(HOLD);
                } else {
                    // No better: back, and try fewer against what `from` measured.
                    let fewer = (from - from / 3).max(floor);
                    if fewer < from {
                        self.set(fewer, Step::Probe { from, throughput: was });
                    } else {
                        self.set(from, Step::Hold(HOLD));
                    }
                }
            }
            Step::Probe { from, throughput: was } => {
                if throughput >= was * SAME && down < limit {
                    self.set(down, Step::Probe { from: limit, throughput });
                } else if throughput >= was * SAME {
                    self.step = Step::Hold(HOLD);
                } else {
                    self.set(from, Step::Hold(HOLD));
                }
            }
        }
    }

    fn set(&mut self, limit: usize, step: Step) {
        if limit != self.limit {
            self.limit = limit;
            self.epoch += 1;
            self.window = Window::default();
        }
        self.step = step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs whole windows through `limit`, the limit filled and each write taking `latency(limit)`
    /// seconds; returns the limit each window ran at, and the one after the last.
    fn drive(limit: &WriteLimit, windows: usize, latency: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut seen = vec![];
        let mut now = Instant::now();
        for _ in 0..windows {
            let n = limit.limit();
            seen.push(n);
            let took = Duration::from_secs_f64(latency(n));
            for _ in 0..(2 * n).max(MIN_WINDOW as usize) {
                let mut permit = limit.try_start().expect("room up to the limit");
                (permit.started, permit.in_flight) = (now, n);
                now += took / u32::try_from(n).unwrap();
                limit.took(&permit, Answer::Answered, permit.started + took);
            }
        }
        seen.push(limit.limit());
        seen
    }

    /// The limit most windows ran at.
    fn mostly(path: &[usize]) -> usize {
        let count = |n: &usize| path.iter().filter(|m| *m == n).count();
        *path.iter().max_by_key(|n| count(n)).expect("windows")
    }

    #[test]
    fn the_limit_climbs_while_more_in_flight_writes_more_per_second_and_stays_where_it_no_longer_does() {
        // Throughput grows up to 24 in flight and is flat beyond: latency grows with the limit there.
        let limit = WriteLimit::new(8, 64);
        let path = drive(&limit, 60, |n| n.max(24) as f64 / 1000.0);
        assert_eq!(&path[..6], &[8, 12, 18, 27, 40, 18], "{path:?}");
        assert_eq!(mostly(&path), 27, "{path:?}");
        assert!(path[2..].iter().all(|n| (18..=40).contains(n)), "only short probes around the knee: {path:?}");
    }

    #[test]
    fn the_limit_never_leaves_its_bounds_and_a_fixed_one_never_moves() {
        let limit = WriteLimit::new(8, 32);
        let path = drive(&limit, 30, |_| 0.01);
        assert!(path.iter().all(|n| (1..=32).contains(n)), "{path:?}");
        assert_eq!(mostly(&path), 32, "latency flat: more in flight is always better: {path:?}");
        let fixed = WriteLimit::fixed(8);
        assert!(drive(&fixed, 20, |n| 0.001 * n as f64).iter().all(|n| *n == 8));
        fixed.try_start().expect("room").finish(Answer::Overloaded);
        assert_eq!(fixed.limit(), 8, "fixed means fixed, overloaded or not");
    }

    #[test]
    fn fewer_in_flight_is_kept_when_it_writes_as_much() {
        // Every write is serialized by the server: throughput is the same at any limit.
        let limit = WriteLimit::new(16, 17);
        let path = drive(&limit, 30, |n| 0.01 * n as f64);
        assert!(limit.limit() < 16, "the limit gives back what buys nothing: {path:?}");
    }

    #[test]
    fn an_overloaded_answer_halves_the_limit_once_for_the_writes_in_flight_together() {
        let limit = WriteLimit::new(16, 32);
        let permits: Vec<_> = (0..16).map(|_| limit.try_start().expect("room")).collect();
        let mut permits = permits.into_iter();
        permits.next().unwrap().finish(Answer::Overloaded);
        assert_eq!(limit.limit(), 8);
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
        let limit = WriteLimit::new(4, 64);
        let permit = limit.try_start().expect("room");
        let _others: Vec<_> = (0..3).map(|_| limit.try_start().expect("room")).collect();
        assert!(limit.try_start().is_none());
        drop(permit);
        assert!(limit.try_start().is_some(), "the abandoned write's place is free again");
        // One write at a time, far under the limit: whatever its latency, the limit stays.
        let idle = WriteLimit::new(8, 64);
        for _ in 0..100 {
            idle.try_start().expect("room").finish(Answer::Answered);
        }
        assert_eq!(idle.limit(), 8);
    }
}
