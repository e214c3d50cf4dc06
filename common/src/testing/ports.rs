//! TCP ports for tests that cannot bind port 0 themselves (a config file must name the port
//! before the process that listens on it starts).
//!
//! Asking the kernel for port 0 and releasing it races twice: the kernel hands the same
//! ephemeral port to the next outgoing connection of any process (every test connects to
//! servers, PostgreSQL, agents), and two test processes asking at once may be given the same
//! port. So a port is taken from below the ephemeral range (`ip_local_port_range` starts at
//! 32768 on Linux), where no connection is given one, and reserved across test processes by an
//! exclusive lock on a file named after it. The lock is held until this process ends (the
//! kernel releases it however the process ends), so no other test process is given the port
//! while this one may still listen on it.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

/// The range ports are reserved from: below Linux's default ephemeral range, above the
/// well-known and common service ports.
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// The lock files this process holds, one per reserved port; never released before exit.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// A TCP port on 127.0.0.1 free now and reserved for this process: no other test process using
/// this function is given it, and no outgoing connection is.
///
/// # Panics
/// If the lock directory cannot be created or no port in the range is free.
pub fn reserve() -> u16 {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot create the port lock directory {}: {e}",
            dir.display()
        )
    });
    let span = u32::from(RANGE.end - RANGE.start);
    let start = seed() % span;
    for i in 0..span {
        let port = RANGE.start + u16::try_from((start + i) % span).unwrap_or(0);
        let Ok(file) = File::create(dir.join(format!("{port}.lock"))) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(file);
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {RANGE:?}");
}

/// Where the lock files live: one directory for every test process of this machine.
fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("continuity-test-ports")
}

/// A start point that differs between processes and calls, so test processes do not all probe
/// the same ports in the same order.
fn seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_below_the_ephemeral_range_and_locked() {
        let a = reserve();
        let b = reserve();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!(RANGE.contains(&p), "{p}");
            let other = File::create(lock_dir().join(format!("{p}.lock"))).unwrap();
            assert!(other.try_lock().is_err(), "port {p} is not locked");
        }
    }
}
