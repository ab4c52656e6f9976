//! Kubernetes API clients with request timeouts, so that an API server that stops answering costs a
//! reconcile a bounded wait (then an error and a backoff), never a task hung forever.
//!
//! kube's own settings do the work: `connect_timeout`, `write_timeout` and `read_timeout` of
//! [`kube::Config`], and its default retry layer (429, 503 and 504, honouring the API server's
//! `Retry-After` header, with exponential backoff). A read timeout cuts a connection that stays silent
//! that long, which a watch legitimately does between events, so watches get a client of their own
//! without one (kube's watcher has an idle timeout of its own).

use std::time::Duration;

use kube::{Client, Config};

/// How long connecting to the API server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sending a request may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the API server may stay silent while answering a request (not a watch): a request left
/// unanswered this long fails, and its reconcile backs off and tries again.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The clients of the controller.
#[derive(Clone)]
pub struct Clients {
    /// For watches: connect and write timeouts, no read timeout.
    pub watches: Client,
    /// For every other request, reads and writes: every timeout.
    pub requests: Client,
}

/// `config` with the connect and write timeouts, for a client that also watches.
pub fn watch_timeouts(mut config: Config) -> Config {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(WRITE_TIMEOUT);
    config
}

/// `config` with every timeout, the read timeout counted from when a request is sent (not from when
/// its pooled connection went idle), for a client that never watches.
pub fn request_timeouts(config: Config) -> Config {
    let mut config = watch_timeouts(config);
    config.read_timeout = Some(READ_TIMEOUT);
    config.reset_reader_on_write = true;
    config
}

/// The agent's one client, configured from the environment: it also watches, so no read timeout.
pub async fn agent() -> anyhow::Result<Client> {
    Ok(Client::try_from(watch_timeouts(Config::infer().await?))?)
}

impl Clients {
    /// The controller's clients, configured from the environment (in-cluster, or `KUBECONFIG`).
    pub async fn infer() -> anyhow::Result<Self> {
        let config = Config::infer().await?;
        Ok(Self {
            watches: Client::try_from(watch_timeouts(config.clone()))?,
            requests: Client::try_from(request_timeouts(config))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("https://127.0.0.1:6443".parse().unwrap())
    }

    #[test]
    fn watches_time_out_connecting_and_sending_but_not_while_reading() {
        let watch = watch_timeouts(config());
        assert_eq!((watch.connect_timeout, watch.write_timeout), (Some(CONNECT_TIMEOUT), Some(WRITE_TIMEOUT)));
        assert_eq!(watch.read_timeout, None);
    }

    #[test]
    fn requests_time_out_at_every_step_and_keep_kube_s_retry() {
        let request = request_timeouts(config());
        assert_eq!((request.connect_timeout, request.write_timeout), (Some(CONNECT_TIMEOUT), Some(WRITE_TIMEOUT)));
        assert_eq!(request.read_timeout, Some(READ_TIMEOUT));
        assert!(request.reset_reader_on_write);
        assert!(request.default_retry, "kube's own retry (429 with Retry-After, 503, 504) stays on");
    }
}
