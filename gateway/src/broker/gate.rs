//! The door of the broker: who a client is, whether it may come in, and what it may do once
//! in. Connections ask the gate; the rules themselves are in [`crate::access`].
//!
//! - Secrets are checked with argon2id, which is slow and memory-hungry on purpose. One
//!   thread of its own does every check, so at most one check's memory (7 MiB) is in use and
//!   the async workers never wait. The outcome is remembered per name (with a SHA-256 of the
//!   secret tried), so a device that reconnects, or a storm of connections with one secret,
//!   costs one check, not one each. When [`HASHING_QUEUE`] checks wait, new clients are told
//!   the server is busy instead of piling up.
//! - The credentials file is read again when it changes (polled once a second) and on a
//!   reload. Connections of a name that was removed, or whose secret changed, are closed.
//! - Publish rates are limited per device name (shared by all its connections) or, for an
//!   anonymous client, per connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::access::{Credentials, CredentialsError, Identity, Role};
use crate::shutdown::Signal;
use crate::sources::Source;

/// Most clients waiting for a secret check; more are refused as "server busy".
pub(crate) const HASHING_QUEUE: usize = 256;
/// How often the credentials file is looked at.
pub(crate) const CREDENTIALS_POLL: Duration = Duration::from_secs(1);

/// How a client proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Proof {
    /// It did not: anonymous.
    None,
    /// Its secret matched this hash (the credentials file's entry).
    Secret(String),
    /// A client certificate signed by the configured CA.
    Certificate,
}

/// A client the gate let in.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    pub(crate) identity: Identity,
    pub(crate) proof: Proof,
}

/// Why the gate refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Unknown name or wrong secret.
    BadCredentials,
    /// No credentials where they are required, or a name the client may not use.
    NotAuthorized(&'static str),
    /// Too many secret checks waiting.
    Busy,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BadCredentials => f.write_str("unknown name or wrong secret"),
            Refusal::NotAuthorized(why) => f.write_str(why),
            Refusal::Busy => f.write_str("too many clients are being authenticated at once"),
        }
    }
}

/// A token bucket: `rate` publishes a second, bursts of up to one second's worth.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: rate,
            at: now,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A rate limit shared by the connections of one name.
pub(crate) type SharedBucket = Arc<Mutex<Bucket>>;

/// The gate. One per broker, shared by every connection.
pub(crate) struct Gate {
    allow_anonymous: bool,
    path: PathBuf,
    credentials: watch::Sender<Arc<Credentials>>,
    sources: RwLock<Arc<[Source]>>,
    memo: Arc<Memo>,
    hasher: mpsc::Sender<Check>,
    rate: u32,
    buckets: Mutex<HashMap<String, SharedBucket>>,
}

impl Gate {
    /// A gate with the credentials of `path` (a missing file has no one in it).
    pub(crate) fn new(
        allow_anonymous: bool,
        path: &Path,
        sources: Vec<Source>,
        rate: u32,
    ) -> Result<Gate, CredentialsError> {
        let credentials = Credentials::load(path)?;
        let memo = Arc::new(Memo::default());
        Ok(Gate {
            allow_anonymous,
            path: path.to_owned(),
            credentials: watch::Sender::new(Arc::new(credentials)),
            sources: RwLock::new(sources.into()),
            memo: memo.clone(),
            hasher: hasher(memo)?,
            rate,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// The credentials in force.
    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.credentials.borrow().clone()
    }

    /// Tells when the credentials change.
    pub(crate) fn changes(&self) -> watch::Receiver<Arc<Credentials>> {
        self.credentials.subscribe()
    }

    /// The sources in force (their topics belong to devices too).
    pub(crate) fn sources(&self) -> Arc<[Source]> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new sources (on a reload).
    pub(crate) fn set_sources(&self, sources: Vec<Source>) {
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) = sources.into();
    }

    /// Reads the credentials file again; returns how many names it has if it changed.
    pub(crate) fn reload(&self) -> Result<Option<usize>, CredentialsError> {
        let fresh = Credentials::load(&self.path)?;
        if **self.credentials.borrow() == fresh {
            return Ok(None);
        }
        let names = fresh.clients.len();
        // Forget outcomes for names that are gone or have a new secret.
        self.memo.forget_stale(&fresh);
        self.credentials.send_replace(Arc::new(fresh));
        Ok(Some(names))
    }

    /// Decides who a client is. `certificate` is the common name of a verified client
    /// certificate; `login` the CONNECT's username and password.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        certificate: Option<String>,
        login: Option<(String, String)>,
    ) -> Result<Admitted, Refusal> {
        let credentials = self.credentials();
        if let Some(name) = certificate {
            if login.as_ref().is_some_and(|(user, _)| *user != name) {
                return Err(Refusal::NotAuthorized(
                    "the username is not the name in the client certificate",
                ));
            }
            let role = credentials
                .clients
                .get(&name)
                .map_or(Role::Device, |e| e.role);
            return Ok(Admitted {
                identity: Identity::Named { name, role },
                proof: Proof::Certificate,
            });
        }
        let Some((name, secret)) = login else {
            return if self.allow_anonymous {
                Ok(Admitted {
                    identity: Identity::Anonymous,
                    proof: Proof::None,
                })
            } else {
                Err(Refusal::NotAuthorized(
                    "anonymous clients are not allowed (broker.allow_anonymous = false): connect with a name and secret from `watchpost device add`",
                ))
            };
        };
        let Some((role, hash)) = credentials
            .clients
            .get(&name)
            .map(|e| (e.role, e.secret.clone()))
        else {
            return Err(Refusal::BadCredentials);
        };
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let admitted = Admitted {
            identity: Identity::Named {
                name: name.clone(),
                role,
            },
            proof: Proof::Secret(hash.clone()),
        };
        let known = match self.memo.recall(&name, &hash, &digest) {
            Some(known) => known,
            None => {
                // The slow check, on the hashing thread; the queue is bounded.
                let (reply, answer) = oneshot::channel();
                let check = Check {
                    credentials,
                    name,
                    hash,
                    secret,
                    digest,
                    reply,
                };
                if self.hasher.try_send(check).is_err() {
                    return Err(Refusal::Busy);
                }
                answer.await.map_err(|_| Refusal::Busy)?
            }
        };
        if known {
            Ok(admitted)
        } else {
            Err(Refusal::BadCredentials)
        }
    }

    /// True while `admitted` is still let in by `credentials` (its entry is there, unchanged).
    pub(crate) fn still_valid(admitted: &Admitted, credentials: &Credentials) -> bool {
        match (&admitted.proof, &admitted.identity) {
            (Proof::Secret(hash), Identity::Named { name, .. }) => credentials
                .clients
                .get(name)
                .is_some_and(|e| e.secret == *hash),
            _ => true,
        }
    }

    /// Publishes a second a device may make (0: no limit).
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    /// The publish rate limit for a client, if there is one.
    pub(crate) fn bucket(&self, identity: &Identity) -> Option<SharedBucket> {
        if self.rate == 0 {
            return None;
        }
        let fresh = || Arc::new(Mutex::new(Bucket::new(self.rate, Instant::now())));
        match identity {
            Identity::Anonymous => Some(fresh()),
            Identity::Named { name, .. } => Some(
                self.buckets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(name.clone())
                    .or_insert_with(fresh)
                    .clone(),
            ),
        }
    }
}

/// A secret check for the hashing thread.
struct Check {
    credentials: Arc<Credentials>,
    name: String,
    /// The entry's hash the secret is checked against.
    hash: String,
    secret: String,
    digest: [u8; 32],
    reply: oneshot::Sender<bool>,
}

/// The last outcome of a secret check per name: the hash it was checked against, the
/// SHA-256 of the secret tried, and whether it matched. One per name, so it is as bounded
/// as the credentials file.
#[derive(Default)]
struct Memo(Mutex<HashMap<String, Outcome>>);

/// The hash checked against, the SHA-256 of the secret tried, and whether it matched.
type Outcome = (String, [u8; 32], bool);

impl Memo {
    fn recall(&self, name: &str, hash: &str, digest: &[u8; 32]) -> Option<bool> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (h, d, ok) = map.get(name)?;
        (h == hash && same(d, digest)).then_some(*ok)
    }

    fn note(&self, name: String, hash: String, digest: [u8; 32], ok: bool) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A remembered success is not replaced by a failure: a stranger with a wrong secret
        // must not make the real device pay a slow check on its next reconnect.
        if !ok
            && map
                .get(&name)
                .is_some_and(|(h, _, good)| *good && *h == hash)
        {
            return;
        }
        map.insert(name, (hash, digest, ok));
    }

    fn forget_stale(&self, fresh: &Credentials) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, (hash, _, _)| {
                fresh.clients.get(name).is_some_and(|e| &e.secret == hash)
            });
    }
}

/// Starts the hashing thread; it ends when the gate is dropped.
fn hasher(memo: Arc<Memo>) -> Result<mpsc::Sender<Check>, CredentialsError> {
    let (tx, mut rx) = mpsc::channel::<Check>(HASHING_QUEUE);
    std::thread::Builder::new()
        .name("watchpost-auth".into())
        .spawn(move || {
            while let Some(check) = rx.blocking_recv() {
                // Checks queued behind one for the same secret need no hashing of their own.
                let ok = match memo.recall(&check.name, &check.hash, &check.digest) {
                    Some(ok) => ok,
                    None => {
                        let ok = check
                            .credentials
                            .verify(&check.name, check.secret.as_bytes())
                            .is_some();
                        memo.note(check.name, check.hash, check.digest, ok);
                        ok
                    }
                };
                let _ = check.reply.send(ok);
            }
        })
        .map_err(|e| CredentialsError::Secret(format!("cannot start the hashing thread: {e}")))?;
    Ok(tx)
}

/// Compares two digests in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the credentials file again whenever it changes, until `shutdown`. A broken file
/// keeps the credentials in force and is reported once per change.
pub(crate) async fn watch_credentials(gate: Arc<Gate>, shutdown: Signal) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut seen = stamp(&gate.path);
    shutdown
        .every(CREDENTIALS_POLL, || {
            let now = stamp(&gate.path);
            if now == seen {
                return;
            }
            seen = now;
            match gate.reload() {
                Ok(Some(names)) => info!(file = %gate.path.display(), names, "credentials changed: removed names are disconnected, new ones may connect"),
                Ok(None) => {}
                Err(e) => error!("the credentials file has an error; the previous credentials stay in force: {e}"),
            }
        })
        .await;
}

/// Warns about a configuration that lets no one in, or anyone.
pub(crate) fn warn_about(gate: &Gate, tls_client_ca: bool) {
    let names = gate.credentials().clients.len();
    if gate.allow_anonymous {
        warn!(
            "broker.allow_anonymous = true: any client that reaches the listener may publish readings; use it only for trials on a trusted network"
        );
    } else if names == 0 && !tls_client_ca {
        warn!(
            file = %gate.path.display(),
            "no device may connect yet: the credentials file has no names; add one with `watchpost device add NAME`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(dir: &Path, anonymous: bool) -> (Arc<Gate>, String) {
        let path = dir.join("credentials.toml");
        let mut creds = Credentials::default();
        let secret = creds.add("boiler-1", Role::Device).unwrap();
        creds.save(&path).unwrap();
        (
            Arc::new(Gate::new(anonymous, &path, Vec::new(), 10).unwrap()),
            secret,
        )
    }

    fn login(name: &str, secret: &str) -> Option<(String, String)> {
        Some((name.to_owned(), secret.to_owned()))
    }

    #[tokio::test]
    async fn secrets_names_and_anonymity() {
        let dir = tempfile::tempdir().unwrap();
        let (closed, secret) = gate(dir.path(), false);
        let ok = closed
            .admit(None, login("boiler-1", &secret))
            .await
            .unwrap();
        assert_eq!(ok.identity.name(), Some("boiler-1"));
        // The second time comes from the remembered proof, and must still check the secret.
        assert!(closed.admit(None, login("boiler-1", &secret)).await.is_ok());
        assert_eq!(
            closed
                .admit(None, login("boiler-1", "guess"))
                .await
                .unwrap_err(),
            Refusal::BadCredentials
        );
        assert_eq!(
            closed
                .admit(None, login("nobody", &secret))
                .await
                .unwrap_err(),
            Refusal::BadCredentials
        );
        assert!(matches!(
            closed.admit(None, None).await.unwrap_err(),
            Refusal::NotAuthorized(_)
        ));
        let (open, _) = gate(dir.path(), true);
        assert_eq!(
            open.admit(None, None).await.unwrap().identity,
            Identity::Anonymous
        );
        // Wrong credentials are refused even where anonymous clients are welcome.
        assert!(open.admit(None, login("boiler-1", "guess")).await.is_err());
    }

    #[tokio::test]
    async fn certificates_name_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, _) = gate(dir.path(), false);
        let a = gate.admit(Some("pump-3".into()), None).await.unwrap();
        assert_eq!(
            a.identity,
            Identity::Named {
                name: "pump-3".into(),
                role: Role::Device
            }
        );
        assert!(
            gate.admit(Some("pump-3".into()), login("pump-4", "x"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn removal_and_new_secrets_end_admissions() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, secret) = gate(dir.path(), false);
        let path = dir.path().join("credentials.toml");
        let admitted = gate.admit(None, login("boiler-1", &secret)).await.unwrap();
        assert!(Gate::still_valid(&admitted, &gate.credentials()));
        let mut changes = gate.changes();

        let mut creds = Credentials::load(&path).unwrap();
        creds.remove("boiler-1");
        let new_secret = creds.add("boiler-1", Role::Device).unwrap();
        creds.save(&path).unwrap();
        assert_eq!(gate.reload().unwrap(), Some(1));
        assert!(changes.has_changed().unwrap());
        assert!(!Gate::still_valid(&admitted, &changes.borrow_and_update()));
        assert!(gate.admit(None, login("boiler-1", &secret)).await.is_err());
        assert!(
            gate.admit(None, login("boiler-1", &new_secret))
                .await
                .is_ok()
        );
        assert_eq!(gate.reload().unwrap(), None, "unchanged file, no news");
    }

    #[test]
    fn buckets_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, t0);
        let taken = (0..20).filter(|_| b.take(t0)).count();
        assert_eq!(taken, 10, "a burst of one second's worth");
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(150)));
        let taken = (0..20)
            .filter(|_| b.take(t0 + Duration::from_secs(10)))
            .count();
        assert_eq!(taken, 10, "never more than the burst");
    }
}
