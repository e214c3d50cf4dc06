//! The PKCS#11 floor: raw `C_Sign` (ECDSA P-256) on SoftHSM2, from a child process that
//! loads SoftHSM with the right SOFTHSM2_CONF.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use continuity_tests::softhsm::{MODULE, SoftHsm};

/// A P-256 session key in a SoftHSM token, signed with through a pool of sessions.
pub struct HsmKey {
    ctx: Pkcs11,
    slot: Slot,
    key: ObjectHandle,
    pool: Mutex<Vec<Session>>,
}

impl HsmKey {
    /// Opens the token labelled `label`, logs in and generates a session key (a token
    /// object when `on_token`).
    pub fn open(label: &str, pin: &str, on_token: bool) -> Self {
        let ctx = Pkcs11::new(MODULE).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
            .unwrap();
        let s0 = ctx.open_rw_session(slot).unwrap();
        s0.login(UserType::User, Some(&AuthPin::new(pin.to_string().into())))
            .unwrap();
        let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let public = [
            Attribute::Token(on_token),
            Attribute::EcParams(p256),
            Attribute::Verify(true),
        ];
        let private = [
            Attribute::Token(on_token),
            Attribute::Sign(true),
            Attribute::Sensitive(true),
            Attribute::Private(true),
        ];
        let (_, key) = s0
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .unwrap();
        Self {
            ctx,
            slot,
            key,
            pool: Mutex::new(vec![s0]),
        }
    }

    /// A new session (the login is per token, so it is logged in).
    pub fn session(&self) -> Session {
        self.ctx.open_rw_session(self.slot).unwrap()
    }

    /// One raw `C_Sign` of a SHA-256 digest on `s`.
    pub fn sign_on(&self, s: &Session, digest: &[u8]) -> Vec<u8> {
        s.sign(&Mechanism::Ecdsa, self.key, digest).unwrap()
    }

    /// One `C_Sign` on a pooled session.
    pub fn sign(&self, digest: &[u8]) -> Vec<u8> {
        let pooled = self.pool.lock().unwrap().pop();
        let s = pooled.unwrap_or_else(|| self.session());
        let sig = self.sign_on(&s, digest);
        self.pool.lock().unwrap().push(s);
        sig
    }
}

impl Drop for HsmKey {
    fn drop(&mut self) {
        self.pool.lock().unwrap().clear();
    }
}

/// Raw C_Sign rate with `threads` sessions, measured in a child process.
pub fn raw_c_sign_rate(hsm: &SoftHsm, threads: usize, secs: f64) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--pkcs11-floor",
            &hsm.label,
            &hsm.pin,
            &threads.to_string(),
            &secs.to_string(),
        ])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RATE "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pkcs11 floor failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Child side of [`raw_c_sign_rate`]: `label pin threads seconds [token]`; prints
/// `RATE <signs/s>`. With `token` the key is a token object instead of a session object.
pub fn pkcs11_floor_child(args: &[String]) {
    let (label, pin, threads, secs): (&str, &str, usize, f64) = (
        &args[0],
        &args[1],
        args[2].parse().unwrap(),
        args[3].parse().unwrap(),
    );
    let key = HsmKey::open(label, pin, args.get(4).is_some_and(|a| a == "token"));
    let digest = [7u8; 32];
    let start = Instant::now();
    let total: u64 = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let key = &key;
                sc.spawn(move || {
                    let s = key.session();
                    let deadline = Instant::now() + Duration::from_secs_f64(secs);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        key.sign_on(&s, &digest);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!("RATE {}", total as f64 / start.elapsed().as_secs_f64());
    drop(key);
}
