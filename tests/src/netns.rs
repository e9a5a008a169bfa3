//! A network namespace of the test's own, for what must listen on an address that is not
//! loopback: made with unshare(2) by a thread of its own, so that nothing is named on the host
//! and nothing outlives the test (the namespace goes when its last thread and descriptor do).
//! Threads move into it with [`Netns::enter`]; processes started from such a thread are in it
//! too. Needs root and iproute2, as CI has.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// A network namespace with loopback up and one address on an interface of its own.
pub struct Netns(File);

impl Netns {
    /// A new namespace with `cidr` (e.g. `10.78.0.1/24`) on the interface `wp0`, or why
    /// this machine cannot make one.
    pub fn with_address(cidr: &str) -> Result<Netns, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("a network namespace needs root (CI runs as root)".into());
        }
        let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.is_file())
            .ok_or("iproute2's `ip` is not installed (apt-get install iproute2)")?;
        let cidr = cidr.to_owned();
        std::thread::spawn(move || -> Result<Netns, String> {
            // SAFETY: unshare(2) moves only this thread, which ends here.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", std::io::Error::last_os_error()));
            }
            for args in [
                &["link", "set", "lo", "up"][..],
                // A veth pair (this kernel may have no dummy interfaces), both ends here.
                &["link", "add", "wp0", "type", "veth", "peer", "name", "wp1"],
                &["addr", "add", &cidr, "dev", "wp0"],
                &["link", "set", "wp0", "up"],
                &["link", "set", "wp1", "up"],
            ] {
                let out = Command::new(&ip)
                    .args(args)
                    .output()
                    .map_err(|e| e.to_string())?;
                if !out.status.success() {
                    return Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            File::open("/proc/thread-self/ns/net")
                .map(Netns)
                .map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the namespace's thread panicked".to_string())?
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        // SAFETY: setns(2) on a descriptor this holds open.
        let r = unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}
