//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never act at once.
//!
//! The holder renews the lease well inside its duration; a replica takes it over only when it has not
//! been renewed for a whole duration. Every update carries the resourceVersion read before it, so two
//! candidates cannot both win. A holder that cannot renew in time gives up (and the process exits):
//! acting on a lease that may have passed to someone else is the one thing this must never do.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

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

/// Held leadership. `lost` turns true when the lease could not be renewed in time.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    release: watch::Sender<bool>,
}

impl Leadership {
    /// Gives the lease up (on shutdown) so that a standby replica takes over at once.
    pub fn release(&self) {
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

/// Waits until this replica holds the lease, then keeps renewing it in the background.
pub async fn acquire(client: Client, s: LeaseSettings) -> Leadership {
    let api = Api::<Lease>::namespaced(client, &s.namespace);
    let mut lease = loop {
        match try_acquire(&api, &s).await {
            Ok(Attempt::Acquired(lease)) => break *lease,
            Ok(Attempt::HeldBy(holder)) => info!(%holder, "waiting for the leader lease"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                info!("lost a race for the leader lease; retrying")
            }
            Err(error) => warn!(%error, "could not read or take the leader lease"),
        }
        tokio::time::sleep(s.renew_every).await;
    };
    info!(identity = %s.identity, lease = %s.name, "became the leader");
    let (lost_tx, lost) = watch::channel(false);
    let (release, mut released) = watch::channel(false);
    tokio::spawn(async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(s.renew_every) => {}
                _ = released.changed() => {
                    if let Some(spec) = lease.spec.as_mut() {
                        spec.holder_identity = None;
                        spec.renew_time = None;
                    }
                    if let Err(error) = api.replace(&s.name, &PostParams::default(), &lease).await {
                        warn!(%error, "could not release the leader lease");
                    }
                    return;
                }
            }
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(now());
            }
            match api.replace(&s.name, &PostParams::default(), &lease).await {
                Ok(renewed) => {
                    lease = renewed;
                    last_renewal = tokio::time::Instant::now();
                }
                Err(error) => {
                    warn!(%error, "could not renew the leader lease");
                    // Someone else may hold it now (409), or the API is unreachable: give up before
                    // the lease could have expired for the others.
                    let conflict = matches!(&error, kube::Error::Api(e) if e.code == 409);
                    if conflict || last_renewal.elapsed() + s.renew_every >= s.duration {
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        }
    });
    Leadership { lost, release }
}
