//! Key lifecycle under a driven clock, custody rules, KV delivery — in process, memory keys.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use continuity_common::{ManualClock, TrustDomain};

use super::model::{Algorithm, Custody, Purpose, Secret, VersionState};
use super::{EngineError, Engines, PublicKey, VersionAction};
use crate::audit::Audit;
use crate::datastore::DataStore;
use crate::keys::{KeyError, KeyHandle, KeyManager, MemoryKeyManager, SoftwareKek};

async fn engines() -> (
    Arc<Engines>,
    Arc<ManualClock>,
    Arc<dyn DataStore>,
    std::path::PathBuf,
) {
    let (dir, _, store) = crate::datastore::scratch_sqlite("engines").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::scratch(store.clone(), clock.clone()).await;
    let e = Engines::load(
        TrustDomain::new("example.org").unwrap(),
        store.clone(),
        Arc::new(MemoryKeyManager::default()),
        clock.clone(),
        audit,
    )
    .await
    .unwrap();
    (e, clock, store, dir)
}

fn verify(pk: &PublicKey, msg: &[u8], sig: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pk.spki).unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.to_vec(),
    )
    .verify(msg, sig)
    .is_ok()
}

#[tokio::test]
async fn rotation_disable_destroy_restore_and_erasure_after_grace() {
    let (e, clock, store, dir) = engines().await;
    e.create_engine("payments", 1, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key("payments", "signing", Purpose::Sign, None, 0, 3600, "admin")
        .await
        .unwrap();
    e.create_key("payments", "data", Purpose::Encrypt, None, 0, 3600, "admin")
        .await
        .unwrap();

    old_versions_decrypt_after_rotation(&e).await;
    signatures_follow_rotation_and_disabling(&e).await;
    destroy_restore_and_erasure_after_grace(&e, &clock, store.as_ref()).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Data encrypted under v1 still decrypts after rotation to v2.
async fn old_versions_decrypt_after_rotation(e: &Engines) {
    let (v, ct1) = e
        .encrypt("payments", "data", b"card 4111", b"ctx", "w")
        .await
        .unwrap();
    assert_eq!(v, 1);
    e.rotate("payments", "data", "admin").await.unwrap();
    let (v, ct2) = e
        .encrypt("payments", "data", b"card 4222", b"ctx", "w")
        .await
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(
        e.decrypt("payments", "data", &ct1, b"ctx", "w")
            .await
            .unwrap(),
        (1, b"card 4111".to_vec())
    );
    assert_eq!(
        e.decrypt("payments", "data", &ct2, b"ctx", "w")
            .await
            .unwrap()
            .1,
        b"card 4222"
    );
    assert!(matches!(
        e.decrypt("payments", "data", &ct1, b"other", "w").await,
        Err(EngineError::Invalid(_))
    ));
}

/// v1 signatures verify while v1 is enabled, v1 still signs after rotation, a disabled
/// version refuses (and leaves the JWKS).
async fn signatures_follow_rotation_and_disabling(e: &Engines) {
    let s1 = e
        .sign("payments", "signing", 0, Some(b"m1"), None, "w")
        .await
        .unwrap();
    assert_eq!(s1.version, 1);
    e.rotate("payments", "signing", "admin").await.unwrap();
    let pk1 = e.public_key("payments", "signing", 1).unwrap();
    assert!(verify(&pk1, b"m1", &s1.signature));
    assert_eq!(
        e.sign("payments", "signing", 0, Some(b"m2"), None, "w")
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        e.sign("payments", "signing", 1, Some(b"m3"), None, "w")
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        e.jwks("payments").unwrap()["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    e.set_state("payments", "signing", 1, VersionAction::Disable, "admin")
        .await
        .unwrap();
    assert!(matches!(
        e.sign("payments", "signing", 1, Some(b"m"), None, "w")
            .await,
        Err(EngineError::Precondition(_))
    ));
    assert_eq!(
        e.jwks("payments").unwrap()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "disabled versions leave the JWKS"
    );
}

/// Destroy → restore within grace → DISABLED, material intact; destroyed for good after it.
async fn destroy_restore_and_erasure_after_grace(
    e: &Engines,
    clock: &ManualClock,
    store: &dyn DataStore,
) {
    // Destroy → restore within grace → DISABLED, material intact.
    e.set_state("payments", "signing", 1, VersionAction::Destroy, "admin")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1800));
    assert_eq!(e.tick().await.unwrap(), 0);
    e.set_state("payments", "signing", 1, VersionAction::Restore, "admin")
        .await
        .unwrap();
    let (_, versions) = e.key("payments", "signing").unwrap();
    assert_eq!(versions[0].state, VersionState::Disabled);
    e.set_state("payments", "signing", 1, VersionAction::Enable, "admin")
        .await
        .unwrap();
    assert!(
        e.sign("payments", "signing", 1, Some(b"back"), None, "w")
            .await
            .is_ok()
    );

    // Destroy again and let the grace pass: DESTROYED, sealed material erased from the datastore.
    e.set_state("payments", "signing", 1, VersionAction::Destroy, "admin")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(3601));
    assert_eq!(e.tick().await.unwrap(), 1);
    let stored = store.list_key_versions().await.unwrap();
    let v1 = stored
        .iter()
        .find(|v| v.key == "signing" && v.version == 1)
        .unwrap();
    assert_eq!(v1.state, VersionState::Destroyed);
    assert!(v1.sealed.is_none(), "material gone from the datastore");
    assert!(matches!(
        e.set_state("payments", "signing", 1, VersionAction::Restore, "admin")
            .await,
        Err(EngineError::Precondition(_))
    ));
    // A reloaded service (restart) cannot resurrect it either.
    let v2 = stored
        .iter()
        .find(|v| v.key == "signing" && v.version == 2)
        .unwrap();
    assert!(v2.sealed.is_some() && v2.mechanism == "aes-256-gcm");
    let verification = e.audit().verify(&[]).await.unwrap();
    assert!(verification.intact(), "{verification:?}");
}

#[tokio::test]
async fn periodic_rotation_follows_the_clock() {
    let (e, clock, _store, dir) = engines().await;
    e.create_engine("billing", 2, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key(
        "billing",
        "k",
        Purpose::Sign,
        Some(Algorithm::EcP256),
        600,
        0,
        "admin",
    )
    .await
    .unwrap();
    clock.advance(Duration::from_secs(601));
    e.tick().await.unwrap();
    assert_eq!(e.key("billing", "k").unwrap().0.primary_version, 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn custody_rules_and_kv_delivery() {
    let (e, _clock, _store, dir) = engines().await;
    // Tier 0 wants an HSM; this key manager has none.
    assert!(matches!(
        e.create_engine("vault", 0, None, None, false, "admin")
            .await,
        Err(EngineError::Precondition(_))
    ));
    // More exposure than the tier's alignment needs the override, which is audited.
    assert!(matches!(
        e.create_engine("x", 1, Some(Custody::Kv), None, false, "admin")
            .await,
        Err(EngineError::Invalid(_))
    ));
    let x = e
        .create_engine("x", 1, Some(Custody::Kv), None, true, "admin")
        .await
        .unwrap();
    assert!(x.exposure_override);
    let audit = e.audit().records(0).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|r| r.action == "engine.create" && r.result.contains("exposure override"))
    );
    // Less exposure is always fine.
    assert!(
        !e.create_engine("y", 2, Some(Custody::Transit), None, false, "admin")
            .await
            .unwrap()
            .exposure_override
    );

    // KV: named secrets and key material are delivered; transit refuses.
    e.put_secret("x", "db-password", b"s3cret", "admin")
        .await
        .unwrap();
    assert_eq!(
        e.fetch_secret("x", "db-password", "w").await.unwrap(),
        (1, b"s3cret".to_vec())
    );
    e.create_key("x", "aes", Purpose::Encrypt, None, 0, 0, "admin")
        .await
        .unwrap();
    assert_eq!(e.fetch_secret("x", "aes", "w").await.unwrap().1.len(), 32);
    e.create_key("y", "signing", Purpose::Sign, None, 0, 0, "admin")
        .await
        .unwrap();
    assert!(matches!(
        e.fetch_secret("y", "signing", "w").await,
        Err(EngineError::Denied(_))
    ));
    assert!(matches!(
        e.put_secret("y", "pw", b"v", "admin").await,
        Err(EngineError::Precondition(_))
    ));
    // Audit records never carry the secret.
    let audit = e.audit().records(0).await.unwrap();
    assert!(audit.iter().all(|r| !format!("{r:?}").contains("s3cret")));
    let _ = std::fs::remove_dir_all(dir);
}

/// A memory key manager whose KEK can be made unavailable (so new versions cannot be sealed),
/// and whose deletes of import-job wrapping keys can be refused (an HSM refusing
/// C_DestroyObject).
#[derive(Debug, Default)]
pub(super) struct FlakyKek {
    inner: MemoryKeyManager,
    broken: std::sync::atomic::AtomicBool,
    kek_calls: std::sync::atomic::AtomicUsize,
    pub(super) refuse_job_deletes: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl KeyManager for FlakyKek {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn generate(
        &self,
        id: &str,
        key_type: crate::keys::KeyType,
    ) -> std::result::Result<Arc<dyn KeyHandle>, KeyError> {
        self.inner.generate(id, key_type).await
    }
    async fn get(&self, id: &str) -> std::result::Result<Option<Arc<dyn KeyHandle>>, KeyError> {
        self.inner.get(id).await
    }
    async fn delete(&self, id: &str) -> std::result::Result<(), KeyError> {
        if id.starts_with("import-job/")
            && self
                .refuse_job_deletes
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(KeyError::Storage("CKR_ACTION_PROHIBITED".into()));
        }
        self.inner.delete(id).await
    }
    async fn kek(&self, id: &str) -> std::result::Result<Arc<dyn crate::keys::Kek>, KeyError> {
        self.kek_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(KeyError::Storage("KEK unavailable".into()));
        }
        self.inner.kek(id).await
    }
    async fn mac_key(
        &self,
        id: &str,
    ) -> std::result::Result<Arc<dyn crate::keys::MacKey>, KeyError> {
        self.inner.mac_key(id).await
    }
}

async fn engines_with(
    km: Arc<dyn KeyManager>,
    store: Arc<dyn DataStore>,
    max: u64,
) -> Arc<Engines> {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::scratch(store.clone(), clock.clone()).await;
    let e = Engines::load(
        TrustDomain::new("example.org").unwrap(),
        store,
        km,
        clock,
        audit,
    )
    .await
    .unwrap();
    e.set_max_encryptions_per_key_version(max);
    e
}

/// Engines with a nonce budget of `max` per key version over a KEK that tests can break, and
/// the Engine `payments` with the AES key `data`.
async fn budgeted_key(
    max: u64,
) -> (
    Arc<Engines>,
    Arc<FlakyKek>,
    Arc<dyn DataStore>,
    std::path::PathBuf,
) {
    let (_, _, store, dir) = engines().await;
    let km = Arc::new(FlakyKek::default());
    let e = engines_with(km.clone(), store.clone(), max).await;
    e.create_engine("payments", 1, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key("payments", "data", Purpose::Encrypt, None, 0, 3600, "admin")
        .await
        .unwrap();
    (e, km, store, dir)
}

fn counts(e: &Engines) -> Vec<(u32, u64)> {
    let (_, versions) = e.key("payments", "data").unwrap();
    versions
        .iter()
        .map(|v| (v.version, v.encryptions))
        .collect()
}

#[tokio::test]
async fn the_nonce_budget_rotates_keys_and_survives_a_restart() {
    let (e, km, store, dir) = budgeted_key(10).await;
    let mut cts = Vec::new();
    for i in 0..25u32 {
        let pt = format!("record {i}");
        let (v, ct) = e
            .encrypt("payments", "data", pt.as_bytes(), b"", "w")
            .await
            .unwrap();
        cts.push((v, pt, ct));
    }
    let versions: Vec<u32> = cts.iter().map(|c| c.0).collect();
    assert_eq!(versions[..10], [1; 10]);
    assert_eq!(versions[10..20], [2; 10]);
    assert_eq!(versions[20..], [3; 5]);
    assert_eq!(counts(&e), vec![(1, 10), (2, 10), (3, 5)]);
    // Old versions still decrypt.
    for (v, pt, ct) in &cts {
        let (dv, out) = e.decrypt("payments", "data", ct, b"", "w").await.unwrap();
        assert_eq!((dv, out.as_slice()), (*v, pt.as_bytes()));
    }
    // Automatic rotations are audited with their reason.
    let audit = store.list_audit().await.unwrap();
    let rotations: Vec<_> = audit.iter().filter(|r| r.action == "key.rotate").collect();
    assert_eq!(rotations.len(), 2);
    assert!(
        rotations.iter().all(|r| r.result.contains("nonce budget")),
        "{rotations:?}"
    );

    // Restart: the reserved counts come back (v3's whole reservation counts: over, never under).
    drop(e);
    let e = engines_with(km.clone(), store.clone(), 10).await;
    let after = counts(&e);
    assert_eq!(after[..2], [(1, 10), (2, 10)]);
    assert!(after[2].1 >= 5 && after[2].1 <= 10, "{after:?}");

    // v3's reservation reached the limit, so the next encryption rotates to v4.
    let (v, ct4) = e
        .encrypt("payments", "data", b"four", b"", "w")
        .await
        .unwrap();
    assert_eq!(v, 4);

    // Rotation impossible (the KEK is gone): v4 runs out and encryption is refused.
    km.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut refused = None;
    for _ in 0..10 {
        match e.encrypt("payments", "data", b"x", b"", "w").await {
            Ok((v, _)) => assert_eq!(v, 4),
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let err = refused.expect("v4's budget runs out within 10 encryptions");
    assert!(matches!(err, EngineError::Precondition(_)), "{err:?}");
    assert!(err.to_string().contains("nonce budget"), "{err}");
    // Decryption keeps working.
    let (_, out) = e.decrypt("payments", "data", &ct4, b"", "w").await.unwrap();
    assert_eq!(out, b"four");
    assert_eq!(e.key("payments", "data").unwrap().0.primary_version, 4);
    let _ = std::fs::remove_dir_all(dir);
}

/// A used-up budget whose rotation fails (KEK unavailable): the many callers that find it
/// are refused with the reason, but only one of them tries the rotation (no storm on the KEK,
/// the write lock and the log).
#[tokio::test]
async fn a_failed_budget_rotation_is_not_retried_by_every_caller() {
    let (e, km, _, dir) = budgeted_key(2).await;
    for _ in 0..2 {
        e.encrypt("payments", "data", b"x", b"", "w").await.unwrap();
    }
    km.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = km.kek_calls.load(std::sync::atomic::Ordering::SeqCst);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let e = e.clone();
        calls.spawn(async move { e.encrypt("payments", "data", b"x", b"", "w").await });
    }
    while let Some(r) = calls.join_next().await {
        let err = r.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::Precondition(_)), "{err:?}");
        assert!(err.to_string().contains("rotation failed"), "{err}");
    }
    let tries = km.kek_calls.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(
        tries, 1,
        "50 refused encryptions tried the rotation {tries} times"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Two servers on one datastore (HA): each reserves its own blocks, and what the other
/// reserved counts against the version's budget here too, so together they never pass it.
#[tokio::test]
async fn the_nonce_budget_holds_across_servers_sharing_a_datastore() {
    let (a, km, store, dir) = budgeted_key(10).await;
    let b = engines_with(km.clone(), store.clone(), 10).await;
    // Nonces taken directly: each server's audit head is its own (see the report), and the
    // budget is what is under test.
    for _ in 0..10 {
        let (_, v) = a.take_nonce("payments", "data").await.unwrap();
        assert_eq!(v.version, 1);
    }
    let (_, v) = b.take_nonce("payments", "data").await.unwrap();
    assert_ne!(
        v.version, 1,
        "server B used v1 past its budget of 10 (server A used all 10)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn debug_of_versions_and_secrets_hides_sealed_material() {
    let (e, _, store, dir) = engines().await;
    e.create_engine("vault", 2, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key("vault", "data", Purpose::Encrypt, None, 0, 3600, "admin")
        .await
        .unwrap();
    let (_, versions) = e.key("vault", "data").unwrap();
    let sealed = versions[0].sealed.clone().unwrap();
    let d = format!("{:?} {:#?} {e:?}", versions[0], versions[0]);
    let list = format!("{:?}", &sealed[..8]);
    assert!(!d.contains(list.trim_end_matches(']')), "{d}");
    assert!(d.contains("redacted"), "{d}");
    let secret = Secret {
        engine: "vault".into(),
        name: "db".into(),
        version: 1,
        sealed: vec![0xcd; 48],
        mechanism: "aes-256-gcm".into(),
        created_at: 0,
    };
    let d = format!("{secret:?}");
    assert!(!d.contains("205"), "{d}");
    assert!(d.contains("48 bytes"), "{d}");
    // The software AES key of transit and kv versions is the key manager's KEK wrapper.
    let soft = SoftwareKek(vec![0xcd; 32]);
    assert!(!format!("{soft:?}").contains("205"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// The at-rest and ciphertext formats are the ones existing data was written in: version
/// material sealed under the KEK bound to `continuity/engine/<e>/<k>/v<n>`, ciphertexts
/// `cty1` ‖ version ‖ nonce ‖ ciphertext ‖ tag under `binding ‖ 0 ‖ aad`.
#[tokio::test]
async fn sealed_material_and_ciphertexts_keep_their_format() {
    let (_, _, store, dir) = engines().await;
    let km = Arc::new(MemoryKeyManager::default());
    let e = engines_with(km.clone(), store, 1 << 20).await;
    e.create_engine("vault", 2, None, None, false, "admin")
        .await
        .unwrap();
    let kek = km.kek(super::KEK_ID).await.unwrap();
    for (name, purpose) in [("data", Purpose::Encrypt), ("signing", Purpose::Sign)] {
        e.create_key("vault", name, purpose, None, 0, 0, "admin")
            .await
            .unwrap();
        // KV custody delivers the raw material: the sealed copy is exactly it.
        let (_, raw) = e.fetch_secret("vault", name, "w").await.unwrap();
        let (_, versions) = e.key("vault", name).unwrap();
        let binding = format!("continuity/engine/vault/{name}/v1");
        let sealed = versions[0].sealed.as_ref().unwrap();
        assert_eq!(kek.open(sealed, binding.as_bytes()).unwrap(), raw);
    }
    let (_, raw) = e.fetch_secret("vault", "data", "w").await.unwrap();
    let aad = b"continuity/engine/vault/data/v1\0ctx";
    let (_, ct) = e
        .encrypt("vault", "data", b"pt", b"ctx", "w")
        .await
        .unwrap();
    assert_eq!(&ct[..8], b"cty1\0\0\0\x01");
    assert_eq!(crate::keys::aes::open(&raw, &ct[8..], aad).unwrap(), b"pt");
    // A ciphertext made outside the service in that format decrypts inside it.
    let mut old = b"cty1\0\0\0\x01".to_vec();
    old.extend(crate::keys::aes::seal(&raw, b"old", aad).unwrap());
    assert_eq!(
        e.decrypt("vault", "data", &old, b"ctx", "w").await.unwrap(),
        (1, b"old".to_vec())
    );
    let _ = std::fs::remove_dir_all(dir);
}
