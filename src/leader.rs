//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never act at once, and
//! the [`Fence`] that keeps a replica from writing once the lease may have passed to another.
//!
//! The holder renews the lease well inside its duration; a replica takes it over only when it has not
//! been renewed for a whole duration. Every update carries the resourceVersion read before it, so two
//! candidates cannot both win. A holder that cannot renew in time gives up (and the process exits):
//! acting on a lease that may have passed to someone else is the one thing this must never do.
//!
//! Giving up is not enough on its own: a process frozen (SIGSTOP, a VM pause, a long GC-like stall)
//! resumes with reconciles in flight that go on writing before the renewal loop even runs. So every
//! write checks the [`Fence`] first, by the process' own monotonic clock (`Instant` is
//! CLOCK_MONOTONIC, which keeps counting while the process is stopped): a renewal sent at `t` keeps
//! the fence open until `t + duration - margin`, and the others may take the lease over only after
//! `renewTime + duration`, where `renewTime` is stamped after `t`.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// The shortest safety margin between the end of this replica's fence and the moment another replica
/// could take the lease over. It absorbs what a fraction of the duration may not on short leases: wall
/// clock skew between nodes (the others judge expiry by `renewTime`, stamped by this replica's wall
/// clock), monotonic clock drift, and a write that passed the fence and is still on its way to the API
/// server.
pub const MIN_SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// The shortest lease duration the margin and the renewal cadence fit in (see [`LeaseSettings::margin`]).
pub const MIN_LEASE_DURATION: Duration = Duration::from_secs(5);

/// Where the lease lives and how it is held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews, and a candidate retries.
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// How long before the others could take the lease over this replica stops writing: a third of the
    /// duration (the same slack the renewal cadence has), at least [`MIN_SAFETY_MARGIN`].
    pub fn margin(&self) -> Duration {
        (self.duration / 3).max(MIN_SAFETY_MARGIN)
    }

    /// The longest a lease request may take. Shorter than the margin, so that a request sent while the
    /// fence was open is over (answered or abandoned) before the others could take the lease over: a
    /// hung renewal never outlives the validity it was meant to extend.
    pub fn request_timeout(&self) -> Duration {
        self.margin() / 2
    }

    /// How soon a failed renewal is tried again (while the fence is still open).
    fn retry_every(&self) -> Duration {
        self.renew_every.min(Duration::from_secs(1))
    }
}

/// Whether this replica may write now. Cheap to clone: every clone sees the same validity. The leader
/// moves "valid until" forward on every successful acquire or renewal; a [`Fence::open`] one (no
/// leader election) never closes.
#[derive(Clone, Debug)]
pub struct Fence(Option<Arc<Validity>>);

#[derive(Debug)]
struct Validity {
    /// The base of `until_nanos`: an `Instant` cannot live in an atomic.
    origin: Instant,
    /// Nanoseconds after `origin` until which writes are allowed; 0 when closed.
    until_nanos: AtomicU64,
}

/// A write refused because this replica may no longer hold the leader lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this replica may no longer hold the leader lease (its fence closed {closed_for:?} ago); writes are refused")]
pub struct Fenced {
    /// How long ago the fence closed.
    pub closed_for: Duration,
}

impl Fence {
    /// Always open: for a controller that runs without leader election.
    pub fn open() -> Self {
        Self(None)
    }

    /// Closed until the first [`Fence::renewed`].
    pub fn closed() -> Self {
        Self(Some(Arc::new(Validity { origin: Instant::now(), until_nanos: AtomicU64::new(0) })))
    }

    /// A renewal (or acquisition) sent at `sent_at` succeeded: writes are allowed until
    /// `sent_at + duration - margin`. Never moves the end backwards.
    pub fn renewed(&self, sent_at: Instant, duration: Duration, margin: Duration) {
        if let Some(v) = &self.0 {
            let until = (sent_at + duration).checked_sub(margin).unwrap_or(v.origin);
            let nanos = until.saturating_duration_since(v.origin).as_nanos();
            v.until_nanos.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
        }
    }

    /// Closes the fence at once (the lease is released or lost).
    pub fn revoke(&self) {
        if let Some(v) = &self.0 {
            v.until_nanos.store(0, Ordering::SeqCst);
        }
    }

    /// Until when writes are allowed; `None` for a fence that never closes.
    pub fn valid_until(&self) -> Option<Instant> {
        self.0.as_ref().map(|v| v.origin + Duration::from_nanos(v.until_nanos.load(Ordering::SeqCst)))
    }

    /// Whether a write may start at `now`.
    pub fn check_at(&self, now: Instant) -> Result<(), Fenced> {
        match self.valid_until() {
            Some(until) if now >= until => Err(Fenced { closed_for: now.saturating_duration_since(until) }),
            _ => Ok(()),
        }
    }

    /// Whether a write may start now.
    pub fn check(&self) -> Result<(), Fenced> {
        self.check_at(Instant::now())
    }

    /// Runs `write` while the fence is open: refused when it is closed already, and abandoned (never
    /// polled again, so no retry of it is sent) the moment it closes. The fence is looked at before
    /// `write` on every poll, by the clock and not only by a timer, so that a process resumed after
    /// being stopped does not let the write go on before it noticed.
    pub async fn guard<T>(&self, write: impl Future<Output = T>) -> Result<T, Fenced> {
        self.check()?;
        let mut write = pin!(write);
        let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
        std::future::poll_fn(|cx| {
            loop {
                if let Err(fenced) = self.check() {
                    return Poll::Ready(Err(fenced));
                }
                let Some(until) = self.valid_until() else { break };
                // Wake at the end of the fence, or at its new end after a renewal moved it.
                if timer.deadline() != until.into() {
                    timer.as_mut().reset(until.into());
                }
                if timer.as_mut().poll(cx).is_pending() {
                    break;
                }
            }
            write.as_mut().poll(cx).map(Ok)
        })
        .await
    }
}

/// Held leadership. `lost` turns true when the lease could not be renewed in time; `fence` closes at
/// the latest then, and earlier when the lease may have passed on (see the module documentation).
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    pub fence: Fence,
    release: watch::Sender<bool>,
}

impl Leadership {
    /// Gives the lease up (on shutdown) so that a standby replica takes over at once. The fence closes
    /// first: no write goes out once the lease may belong to someone else.
    pub fn release(&self) {
        self.fence.revoke();
        let _ = self.release.send(true);
    }
}

enum Attempt {
    Acquired(Box<Lease>),
    HeldBy(String),
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(lease: &Lease, duration: Duration) -> bool {
    let spec = lease.spec.as_ref();
    let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    let seconds = spec.and_then(|s| s.lease_duration_seconds).map(i64::from).unwrap_or(duration.as_secs() as i64);
    match renewed {
        Some(at) => Timestamp::now() > at + SignedDuration::from_secs(seconds),
        None => true,
    }
}

async fn try_acquire(api: &Api<Lease>, s: &LeaseSettings) -> kube::Result<Attempt> {
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(s.duration.as_secs() as i32),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&s.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec(0)),
        };
        return Ok(Attempt::Acquired(Box::new(api.create(&PostParams::default(), &lease).await?)));
    };
    let holder = lease.spec.as_ref().and_then(|l| l.holder_identity.clone()).unwrap_or_default();
    if !holder.is_empty() && holder != s.identity && !expired(&lease, s.duration) {
        return Ok(Attempt::HeldBy(holder));
    }
    let transitions =
        lease.spec.as_ref().and_then(|l| l.lease_transitions).unwrap_or(0) + i32::from(holder != s.identity);
    lease.spec = Some(spec(transitions));
    Ok(Attempt::Acquired(Box::new(api.replace(&s.name, &PostParams::default(), &lease).await?)))
}

/// A lease request bounded by [`LeaseSettings::request_timeout`]; a timeout is a `None`.
async fn bounded<T>(s: &LeaseSettings, request: impl Future<Output = kube::Result<T>>) -> Option<kube::Result<T>> {
    tokio::time::timeout(s.request_timeout(), request).await.ok()
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == 409)
}

/// Waits until this replica holds the lease, then keeps renewing it in the background.
pub async fn acquire(client: Client, s: LeaseSettings) -> Leadership {
    let api = Api::<Lease>::namespaced(client, &s.namespace);
    let fence = Fence::closed();
    let mut lease = loop {
        // Taken before the request: `renewTime` is stamped after it, so the others' view of the
        // lease's expiry is never earlier than this replica's.
        let sent_at = Instant::now();
        match bounded(&s, try_acquire(&api, &s)).await {
            Some(Ok(Attempt::Acquired(lease))) => {
                fence.renewed(sent_at, s.duration, s.margin());
                break *lease;
            }
            Some(Ok(Attempt::HeldBy(holder))) => info!(%holder, "waiting for the leader lease"),
            Some(Err(error)) if is_conflict(&error) => info!("lost a race for the leader lease; retrying"),
            Some(Err(error)) => warn!(%error, "could not read or take the leader lease"),
            None => warn!(timeout = ?s.request_timeout(), "taking the leader lease timed out"),
        }
        tokio::time::sleep(s.renew_every).await;
    };
    info!(identity = %s.identity, lease = %s.name, margin = ?s.margin(), "became the leader");
    let (lost_tx, lost) = watch::channel(false);
    let (release, mut released) = watch::channel(false);
    let renewing = fence.clone();
    tokio::spawn(async move {
        let fence = renewing;
        let mut pause = s.renew_every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = released.changed() => {
                    fence.revoke();
                    if let Some(spec) = lease.spec.as_mut() {
                        spec.holder_identity = None;
                        spec.renew_time = None;
                    }
                    match bounded(&s, api.replace(&s.name, &PostParams::default(), &lease)).await {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => warn!(%error, "could not release the leader lease"),
                        None => warn!("releasing the leader lease timed out"),
                    }
                    return;
                }
            }
            // Past the fence, the lease may have passed on (e.g. after this process was stopped):
            // renewing it now could succeed, but the writes refused meanwhile say it is time to go.
            if let Err(fenced) = fence.check() {
                warn!(%fenced, "the leader lease was not renewed in time");
                let _ = lost_tx.send(true);
                return;
            }
            let sent_at = Instant::now();
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(now());
            }
            match bounded(&s, api.replace(&s.name, &PostParams::default(), &lease)).await {
                Some(Ok(renewed)) => {
                    lease = renewed;
                    fence.renewed(sent_at, s.duration, s.margin());
                    pause = s.renew_every;
                }
                Some(Err(error)) if is_conflict(&error) => {
                    // Someone else holds it now.
                    fence.revoke();
                    warn!(%error, "the leader lease was taken over");
                    let _ = lost_tx.send(true);
                    return;
                }
                failed => {
                    match failed {
                        Some(Err(error)) => warn!(%error, "could not renew the leader lease; retrying"),
                        _ => warn!(timeout = ?s.request_timeout(), "renewing the leader lease timed out; retrying"),
                    }
                    pause = s.retry_every();
                }
            }
        }
    });
    Leadership { lost, fence, release }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(duration: u64) -> LeaseSettings {
        LeaseSettings {
            namespace: "crosstrace-system".into(),
            name: "crosstrace-controller".into(),
            identity: "a".into(),
            duration: Duration::from_secs(duration),
            renew_every: Duration::from_secs((duration / 3).max(1)),
        }
    }

    #[test]
    fn the_margin_is_a_third_of_the_lease_and_at_least_two_seconds() {
        assert_eq!(settings(15).margin(), Duration::from_secs(5));
        assert_eq!(settings(6).margin(), Duration::from_secs(2));
        assert_eq!(settings(5).margin(), MIN_SAFETY_MARGIN);
    }

    #[test]
    fn lease_requests_time_out_well_inside_the_margin() {
        for duration in [5, 6, 15, 60] {
            let s = settings(duration);
            assert!(s.request_timeout() < s.margin(), "{duration}s");
        }
    }

    #[test]
    fn renewals_keep_the_fence_open_without_a_gap_for_every_allowed_duration() {
        // A renewal is sent `renew_every` after the previous one and answered within the request
        // timeout: the fence it extends must not have closed by then.
        for duration in MIN_LEASE_DURATION.as_secs()..=120 {
            let s = settings(duration);
            let validity = s.duration - s.margin();
            assert!(s.renew_every + s.request_timeout() < validity, "{duration}s lease");
        }
    }

    #[test]
    fn an_open_fence_never_closes() {
        let fence = Fence::open();
        assert_eq!(fence.check_at(Instant::now() + Duration::from_secs(1_000_000)), Ok(()));
        fence.revoke();
        assert_eq!(fence.check(), Ok(()));
        assert_eq!(fence.valid_until(), None);
    }

    #[test]
    fn a_new_fence_is_closed_until_the_first_renewal() {
        let fence = Fence::closed();
        assert!(fence.check().is_err());
    }

    #[test]
    fn a_renewal_opens_the_fence_until_the_lease_duration_minus_the_margin_after_it_was_sent() {
        let fence = Fence::closed();
        let sent_at = Instant::now();
        fence.renewed(sent_at, Duration::from_secs(15), Duration::from_secs(5));
        assert_eq!(fence.check_at(sent_at), Ok(()));
        assert_eq!(fence.check_at(sent_at + Duration::from_millis(9_999)), Ok(()));
        // The others could take over at sent_at + 15 s at the earliest: the fence closed 5 s before.
        assert_eq!(fence.check_at(sent_at + Duration::from_secs(10)), Err(Fenced { closed_for: Duration::ZERO }));
        assert_eq!(
            fence.check_at(sent_at + Duration::from_secs(15)),
            Err(Fenced { closed_for: Duration::from_secs(5) })
        );
    }

    #[test]
    fn a_late_answer_to_an_older_renewal_never_shortens_the_fence() {
        let fence = Fence::closed();
        let first = Instant::now();
        let second = first + Duration::from_secs(5);
        fence.renewed(second, Duration::from_secs(15), Duration::from_secs(5));
        fence.renewed(first, Duration::from_secs(15), Duration::from_secs(5));
        assert_eq!(fence.valid_until(), Some(second + Duration::from_secs(10)));
    }

    #[test]
    fn every_clone_sees_a_renewal_and_a_revocation() {
        let fence = Fence::closed();
        let clone = fence.clone();
        fence.renewed(Instant::now(), Duration::from_secs(15), Duration::from_secs(5));
        assert_eq!(clone.check(), Ok(()));
        fence.revoke();
        assert!(clone.check().is_err());
    }

    #[tokio::test]
    async fn a_guarded_write_is_not_started_behind_a_closed_fence() {
        let fence = Fence::closed();
        let mut started = false;
        let result = fence.guard(async { started = true }).await;
        assert!(result.is_err());
        assert!(!started, "the write was never polled");
    }

    #[tokio::test]
    async fn a_guarded_write_is_abandoned_when_the_fence_closes_under_it() {
        let fence = Fence::closed();
        fence.renewed(Instant::now(), Duration::from_millis(300), Duration::from_millis(100));
        let started = Instant::now();
        let result = fence.guard(std::future::pending::<()>()).await;
        assert!(result.is_err(), "a write that outlives the fence is refused");
        assert!(started.elapsed() < Duration::from_secs(1), "abandoned when the fence closed, not later");
    }

    #[tokio::test]
    async fn a_guarded_write_goes_on_when_a_renewal_moves_the_fence_under_it() {
        let fence = Fence::closed();
        fence.renewed(Instant::now(), Duration::from_millis(300), Duration::from_millis(100));
        let renewer = fence.clone();
        let renewal = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            renewer.renewed(Instant::now(), Duration::from_secs(10), Duration::from_secs(1));
        });
        let result = fence.guard(tokio::time::sleep(Duration::from_millis(400))).await;
        assert_eq!(result, Ok(()), "the write outlived the first end of the fence, within the renewed one");
        renewal.await.unwrap();
    }
}
