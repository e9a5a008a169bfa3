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
use crate::acl::{AclRule, Policy};
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
    /// Its secret matched the credentials file's entry with this hash (fingerprinted).
    Secret(Fingerprint),
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

    /// True if it has refilled by `now`: then it is the same as a fresh one.
    fn full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.rate
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

/// Names with a rate limit remembered beyond which those of names no connection uses, and
/// refilled, are forgotten (names of client certificates need not be in the credentials file,
/// so there may be any number of them over time).
const BUCKETS_BEFORE_PRUNING: usize = 1024;

/// Drops the buckets no connection holds that have refilled: a fresh one is the same.
fn prune_buckets(buckets: &mut HashMap<String, SharedBucket>, now: Instant) {
    buckets.retain(|_, b| {
        Arc::strong_count(b) > 1 || !b.lock().unwrap_or_else(|p| p.into_inner()).full(now)
    });
    if buckets.capacity() > 4 * buckets.len().max(64) {
        buckets.shrink_to_fit();
    }
}

/// A rate limit shared by the connections of one name.
pub(crate) type SharedBucket = Arc<Mutex<Bucket>>;

/// The gate. One per broker, shared by every connection.
pub(crate) struct Gate {
    allow_anonymous: bool,
    path: PathBuf,
    credentials: watch::Sender<Arc<Credentials>>,
    policy: RwLock<Arc<Policy>>,
    memo: Arc<Memo>,
    hasher: mpsc::Sender<Check>,
    rate: u32,
    buckets: Mutex<HashMap<String, SharedBucket>>,
    clients: Clients,
    /// The site's other gateway: its id and the secret both share.
    peer: RwLock<Option<(String, crate::peer::Secret)>>,
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
            policy: RwLock::new(Arc::new(Policy::new(Vec::new(), sources.into()))),
            memo: memo.clone(),
            hasher: hasher(memo)?,
            rate,
            buckets: Mutex::new(HashMap::new()),
            clients: Clients::default(),
            peer: RwLock::new(None),
        })
    }

    /// Admits the site's other gateway, `name`, by tokens of `secret`.
    pub(crate) fn set_peer(&self, name: &str, secret: crate::peer::Secret) {
        *self.peer.write().unwrap_or_else(|p| p.into_inner()) = Some((name.to_owned(), secret));
    }

    /// The peer path of [`Gate::admit`]: user name `watchpost-peer-{name}`, password a token.
    fn admit_peer(&self, user: &str, password: &str) -> Result<Admitted, Refusal> {
        let peer = self.peer.read().unwrap_or_else(|p| p.into_inner());
        let Some((name, secret)) = peer.as_ref() else {
            return Err(Refusal::BadCredentials);
        };
        let claimed = user.strip_prefix(crate::peer::CLIENT_PREFIX);
        if claimed != Some(name.as_str()) || !secret.verify(name, password, crate::peer::unix_now())
        {
            return Err(Refusal::BadCredentials);
        }
        Ok(Admitted {
            identity: Identity::Named {
                name: user.to_owned(),
                role: Role::Peer,
            },
            proof: Proof::None,
        })
    }

    /// The credentials in force.
    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.credentials.borrow().clone()
    }

    /// Registers a connection of `admitted` under `client_id`; a connection with the same id
    /// is told to go.
    pub(crate) fn register(&self, client_id: &str, admitted: &Admitted) -> Registration {
        let proved = match (&admitted.proof, &admitted.identity) {
            (Proof::Secret(f), Identity::Named { name, .. }) => Some((name.as_str().into(), *f)),
            _ => None,
        };
        let registration = self.clients.register(client_id, proved);
        // Credentials reloaded between this client's admission and now were not checked
        // against it: check them here (a reload swaps the credentials in before it revokes).
        registration.revoke_unless(&self.credentials());
        registration
    }

    /// Removes a connection's registration (unless a newer one took the id).
    pub(crate) fn unregister(&self, client_id: &str, registration: &Registration) {
        self.clients.unregister(client_id, registration);
    }

    /// The ACL rules and sources in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in new ACL rules and sources (at start and on a reload).
    pub(crate) fn set_policy(&self, acl: Vec<AclRule>, sources: Vec<Source>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Policy::new(acl, sources.into()));
    }

    /// Reads the credentials file again; returns how many names it has if it changed.
    pub(crate) fn reload(&self) -> Result<Option<usize>, CredentialsError> {
        let fresh = Credentials::load(&self.path)?;
        if **self.credentials.borrow() == fresh {
            return Ok(None);
        }
        let names = fresh.clients.len();
        // Forget outcomes for names that are gone or have a new secret, and show their
        // connections the door.
        self.memo.forget_stale(&fresh);
        let fresh = Arc::new(fresh);
        self.credentials.send_replace(fresh.clone());
        let revoked = self.clients.revoke(&fresh);
        if revoked > 0 {
            info!(
                revoked,
                "connections of removed or changed names are being closed"
            );
        }
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
        if let Some((user, password)) = &login {
            if user.starts_with(crate::peer::CLIENT_PREFIX) {
                return self.admit_peer(user, password);
            }
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
            proof: Proof::Secret(fingerprint(&hash)),
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
            // The peer mirrors a whole site's publishes.
            Identity::Named {
                role: Role::Peer, ..
            } => None,
            Identity::Named { name, .. } => {
                let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(bucket) = buckets.get(name) {
                    return Some(bucket.clone());
                }
                if buckets.len() >= BUCKETS_BEFORE_PRUNING {
                    prune_buckets(&mut buckets, Instant::now());
                }
                Some(buckets.entry(name.clone()).or_insert_with(fresh).clone())
            }
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

/// Connected clients by client id, so that a newer connection takes over an older one with
/// the same id (as MQTT requires), whether or not either has a router link, and so that a
/// name removed from the credentials can be shown the door.
#[derive(Default)]
struct Clients {
    by_id: Mutex<HashMap<String, Registration>>,
    serial: std::sync::atomic::AtomicU64,
}

/// One connection's entry in [`Clients`].
#[derive(Clone)]
pub(crate) struct Registration {
    serial: u64,
    kick: Arc<Kick>,
    /// For a client that proved a secret: its name and the fingerprint of the hash it proved.
    proved: Option<(Box<str>, Fingerprint)>,
}

/// How a connection is told to go.
#[derive(Default)]
struct Kick {
    notify: tokio::sync::Notify,
    /// Set when the reason is revoked credentials (else: another connection took the id).
    revoked: std::sync::atomic::AtomicBool,
}

impl Registration {
    /// Resolves when the connection must go: `true` if its credentials were revoked, `false`
    /// if a newer connection took its client id.
    pub(crate) async fn kicked(&self) -> bool {
        self.kick.notify.notified().await;
        self.kick.revoked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells this connection to go if `credentials` no longer accept its proof; true if it
    /// did.
    fn revoke_unless(&self, credentials: &Credentials) -> bool {
        let Some((name, proved)) = &self.proved else {
            return false;
        };
        let valid = credentials
            .clients
            .get(&**name)
            .is_some_and(|e| fingerprint(&e.secret) == *proved);
        if !valid {
            self.kick
                .revoked
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.kick.notify.notify_one();
        }
        !valid
    }
}

impl Clients {
    /// Registers a connection under `client_id`, telling the one it replaces to go.
    fn register(&self, client_id: &str, proved: Option<(Box<str>, Fingerprint)>) -> Registration {
        let registration = Registration {
            serial: self
                .serial
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            kick: Arc::default(),
            proved,
        };
        let old = self
            .by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_owned(), registration.clone());
        if let Some(old) = old {
            // Stored if the old connection is not waiting right now: it sees it next time.
            old.kick.notify.notify_one();
        }
        registration
    }

    /// Removes the entry, unless a newer connection has taken the id since.
    fn unregister(&self, client_id: &str, registration: &Registration) {
        let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if by_id
            .get(client_id)
            .is_some_and(|r| r.serial == registration.serial)
        {
            by_id.remove(client_id);
        }
    }

    /// Tells every connection whose proof `credentials` no longer accepts to go.
    fn revoke(&self, credentials: &Credentials) -> usize {
        let by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        by_id
            .values()
            .filter(|r| r.revoke_unless(credentials))
            .count()
    }
}

/// A short fingerprint of a secret's hash: enough to tell that an entry changed, without
/// keeping the hash itself with every connection.
pub(crate) type Fingerprint = [u8; 16];

fn fingerprint(hash: &str) -> Fingerprint {
    let digest = Sha256::digest(hash.as_bytes());
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
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
        let registration = gate.register("boiler-1", &admitted);
        let kicked = tokio::spawn(async move { registration.kicked().await });

        let mut creds = Credentials::load(&path).unwrap();
        creds.remove("boiler-1");
        let new_secret = creds.add("boiler-1", Role::Device).unwrap();
        creds.save(&path).unwrap();
        assert_eq!(gate.reload().unwrap(), Some(1));
        let revoked = tokio::time::timeout(Duration::from_secs(5), kicked)
            .await
            .expect("the connection is told to go")
            .unwrap();
        assert!(revoked, "told why: its credentials were revoked");
        assert!(gate.admit(None, login("boiler-1", &secret)).await.is_err());
        assert!(
            gate.admit(None, login("boiler-1", &new_secret))
                .await
                .is_ok()
        );
        assert_eq!(gate.reload().unwrap(), None, "unchanged file, no news");
    }

    #[tokio::test]
    async fn a_newer_client_id_takes_over_and_unregistering_the_old_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, secret) = gate(dir.path(), false);
        let admitted = gate.admit(None, login("boiler-1", &secret)).await.unwrap();
        let first = gate.register("boiler-1", &admitted);
        let second = gate.register("boiler-1", &admitted);
        let revoked = tokio::time::timeout(Duration::from_secs(5), first.kicked())
            .await
            .expect("the older connection is told to go");
        assert!(!revoked, "told why: its client id was taken");
        // The old connection leaves after the new one came: the new one stays registered, so
        // a revocation still reaches it.
        gate.unregister("boiler-1", &first);
        Credentials::default()
            .save(&dir.path().join("credentials.toml"))
            .unwrap();
        assert_eq!(gate.reload().unwrap(), Some(0));
        let revoked = tokio::time::timeout(Duration::from_secs(5), second.kicked())
            .await
            .expect("the newer connection is told to go");
        assert!(revoked);
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

    #[test]
    fn pruning_forgets_only_refilled_buckets_no_connection_holds() {
        let t0 = Instant::now();
        let bucket = |tokens_taken: usize| {
            let b = Arc::new(Mutex::new(Bucket::new(10, t0)));
            for _ in 0..tokens_taken {
                b.lock().unwrap().take(t0);
            }
            b
        };
        let mut buckets = HashMap::new();
        buckets.insert("gone-full".to_owned(), bucket(0));
        buckets.insert("gone-drained".to_owned(), bucket(10));
        let held = bucket(0);
        buckets.insert("connected".to_owned(), held.clone());
        prune_buckets(&mut buckets, t0 + Duration::from_millis(100));
        let mut left: Vec<_> = buckets.keys().cloned().collect();
        left.sort();
        assert_eq!(
            left,
            ["connected", "gone-drained"],
            "a drained bucket still limits"
        );
        prune_buckets(&mut buckets, t0 + Duration::from_secs(2));
        assert_eq!(
            buckets.len(),
            1,
            "refilled by then: the same as a fresh one"
        );
        drop(held);
        prune_buckets(&mut buckets, t0 + Duration::from_secs(2));
        assert!(buckets.is_empty());
    }
}
