//! Key import in process (transit custody, memory keys, a driven clock): imported versions
//! work as the original material, are endorsed and marked; every hostile blob or job is
//! refused with its reason, audited, and leaves the key as it was; jobs expire after three
//! days and their wrapping keys go.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use continuity_common::endorsement::verify_chain;
use continuity_common::{ManualClock, TrustDomain};

use super::import::IMPORT_JOB_LIFETIME;
use super::model::{Algorithm, ImportJobState, Purpose};
use super::{EngineError, Engines, ImportVersion};
use crate::audit::Audit;
use crate::datastore::DataStore;
use crate::keys::MemoryKeyManager;
use crate::keys::import_wrap::tests::wrap_with;
use crate::keys::import_wrap::{ImportMethod, OaepHash};

async fn engines() -> (
    Arc<Engines>,
    Arc<ManualClock>,
    Arc<dyn DataStore>,
    std::path::PathBuf,
) {
    let (dir, _, store) = crate::datastore::scratch_sqlite("import").await;
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
    for engine in ["vault", "other"] {
        e.create_engine(engine, 1, None, None, false, "admin")
            .await
            .unwrap();
    }
    e.create_key("vault", "signing", Purpose::Sign, None, 0, 10, "admin")
        .await
        .unwrap();
    e.create_key("vault", "data", Purpose::Encrypt, None, 0, 10, "admin")
        .await
        .unwrap();
    (e, clock, store, dir)
}

fn import(key: &str, job: &str, wrapped: Vec<u8>) -> ImportVersion {
    ImportVersion {
        engine: "vault".into(),
        key: key.into(),
        job: job.into(),
        wrapped,
        public_key: None,
    }
}

/// How many import-job expiries the audit log holds.
async fn expiries(audit: &Audit) -> usize {
    audit
        .records(0)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.action == "key.import_job.expire")
        .count()
}

/// How many versions `vault/key` has.
fn versions(e: &Engines, key: &str) -> usize {
    e.key("vault", key).unwrap().1.len()
}

#[tokio::test]
async fn imported_material_becomes_an_endorsed_primary_version_that_works_as_the_original() {
    let (e, _clock, store, dir) = engines().await;
    let job = e.create_import_job("vault", None, "admin").await.unwrap();
    assert_eq!(job.method, ImportMethod::RsaOaep3072Sha256Aes256);
    assert_eq!(job.expires_at - job.created_at, IMPORT_JOB_LIFETIME);
    assert_eq!(job.state, ImportJobState::Active);
    assert_eq!(
        e.import_jobs(Some("vault")).await.unwrap(),
        vec![job.clone()]
    );
    assert!(e.import_jobs(Some("other")).await.unwrap().is_empty());

    // A P-256 key made elsewhere: the Engine signs with it, the original public key verifies.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let original =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let v1_spki = e.public_key("vault", "signing", 1).unwrap().spki;
    let blob = wrap_with(&job.public_key, pkcs8.as_ref(), OaepHash::Sha256);
    let key = e
        .import_version(import("signing", &job.id, blob), "admin")
        .await
        .unwrap();
    assert_eq!(key.primary_version, 2);
    let (_, vs) = e.key("vault", "signing").unwrap();
    assert_eq!((vs[0].imported, vs[1].imported), (false, true));
    let sig = e
        .sign("vault", "signing", 0, Some(b"pay 7"), None, "w")
        .await
        .unwrap();
    assert_eq!(sig.version, 2);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, original.public_key().as_ref())
        .verify(b"pay 7", &sig.signature)
        .unwrap();
    // Endorsed by v1, as a rotation is: a relying party pinned to v1 reaches it.
    let chain = verify_chain(&e.jwks("vault").unwrap(), "signing", &v1_spki).unwrap();
    let path: Vec<u32> = chain.path.iter().map(|s| s.version).collect();
    assert_eq!(path, [1, 2]);
    // Stored as imported (read back from the datastore, MAC-checked).
    let stored = store.list_key_versions().await.unwrap();
    assert!(
        stored
            .iter()
            .any(|v| v.key == "signing" && v.version == 2 && v.imported)
    );

    // An AES-256 key made elsewhere: what the Engine encrypts, the original key decrypts.
    let raw: [u8; 32] = continuity_common::rand::array().unwrap();
    let blob = wrap_with(&job.public_key, &raw, OaepHash::Sha256);
    e.import_version(import("data", &job.id, blob), "admin")
        .await
        .unwrap();
    let (v, ct) = e
        .encrypt("vault", "data", b"card 4111", b"ctx", "w")
        .await
        .unwrap();
    assert_eq!(v, 2);
    // cty1 ‖ version ‖ nonce ‖ AES-256-GCM, bound to engine/key/version.
    assert_eq!(&ct[..8], b"cty1\0\0\0\x02");
    let aad = [b"continuity/engine/vault/data/v2\0".as_slice(), b"ctx"].concat();
    let mut body = ct[20..].to_vec();
    let clear = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap())
        .open_in_place(
            Nonce::try_assume_unique_for_key(&ct[8..20]).unwrap(),
            Aad::from(&aad),
            &mut body,
        )
        .unwrap();
    assert_eq!(clear, b"card 4111");

    let actions: Vec<String> = e
        .audit()
        .records(0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{} {}", r.action, r.result))
        .collect();
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("key.import_job.create ok; ij-")),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("key.import ok; imported through ij-")),
        "{actions:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn hostile_blobs_and_jobs_are_refused_audited_and_change_nothing() {
    let (e, clock, store, dir) = engines().await;
    let job = e.create_import_job("vault", None, "admin").await.unwrap();
    let other = e.create_import_job("other", None, "admin").await.unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ec = ec.as_ref().to_vec();
    let aes: [u8; 32] = continuity_common::rand::array().unwrap();
    let good = wrap_with(&job.public_key, &ec, OaepHash::Sha256);
    let mut garbled = good.clone();
    *garbled.last_mut().unwrap() ^= 1;
    let invalid = |e: EngineError| matches!(e, EngineError::Invalid(_));
    type Case<'a> = (&'a str, ImportVersion, fn(EngineError) -> bool, &'a str);
    let cases: Vec<Case> = vec![
        (
            "garbled",
            import("signing", &job.id, garbled),
            invalid,
            "does not unwrap",
        ),
        (
            "truncated",
            import("signing", &job.id, good[..300].to_vec()),
            invalid,
            "too short",
        ),
        (
            "SHA-1 on a SHA-256 job",
            import(
                "signing",
                &job.id,
                wrap_with(&job.public_key, &ec, OaepHash::Sha1),
            ),
            invalid,
            "RSA-OAEP part",
        ),
        (
            "AES into a sign key",
            import(
                "signing",
                &job.id,
                wrap_with(&job.public_key, &aes, OaepHash::Sha256),
            ),
            invalid,
            "not a PKCS#8 ec-p256",
        ),
        (
            "EC into an encrypt key",
            import("data", &job.id, good.clone()),
            invalid,
            "an AES-256 key is 32",
        ),
        (
            "another Engine's job",
            import(
                "signing",
                &other.id,
                wrap_with(&other.public_key, &ec, OaepHash::Sha256),
            ),
            invalid,
            "belongs to engine other",
        ),
        (
            "no such job",
            import("signing", "ij-0000000000000000", good.clone()),
            |e| matches!(e, EngineError::NotFound(_)),
            "not found",
        ),
        (
            "oversized",
            import("signing", &job.id, vec![0; 64 * 1024]),
            invalid,
            "at most",
        ),
    ];
    for (what, req, status, reason) in cases {
        let err = e.import_version(req, "admin").await.expect_err(what);
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert!(status(err), "{what}: wrong status");
        assert_eq!(
            (versions(&e, "signing"), versions(&e, "data")),
            (1, 1),
            "{what}"
        );
    }
    // A public key that is not the imported key's is refused too.
    let stranger = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let mut req = import("signing", &job.id, good.clone());
    req.public_key = Some(crate::keys::spki_of(
        crate::keys::KeyType::EcP256,
        stranger.public_key().as_ref(),
    ));
    let err = e.import_version(req, "admin").await.unwrap_err();
    assert!(
        err.to_string().contains("not the imported private key's"),
        "{err}"
    );
    // An RSA key refuses P-256 material.
    e.create_key(
        "vault",
        "rsa",
        Purpose::Sign,
        Some(Algorithm::Rsa2048),
        0,
        10,
        "admin",
    )
    .await
    .unwrap();
    let err = e
        .import_version(import("rsa", &job.id, good.clone()), "admin")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a PKCS#8 rsa-2048"), "{err}");
    // ... and RSA material of another size.
    let rsa3072 = {
        use aws_lc_rs::encoding::AsDer;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).unwrap();
        let der: aws_lc_rs::encoding::Pkcs8V1Der = kp.as_der().unwrap();
        der.as_ref().to_vec()
    };
    let blob = wrap_with(&job.public_key, &rsa3072, OaepHash::Sha256);
    let err = e
        .import_version(import("rsa", &job.id, blob), "admin")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a PKCS#8 rsa-2048"), "{err}");
    // Every refusal is in the audit log; nothing was written besides.
    let refused = e
        .audit()
        .records(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "key.import" && r.result.starts_with("refused: "))
        .count();
    assert_eq!(
        refused,
        11,
        "{:?}",
        e.audit()
            .records(0)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.action.clone(), r.result.clone()))
            .collect::<Vec<_>>()
    );
    assert!(
        !store
            .list_key_versions()
            .await
            .unwrap()
            .iter()
            .any(|v| v.imported)
    );

    // Three days on, the job is expired: imports are refused, and the sweep destroys its
    // wrapping key (the sealed copy is erased).
    clock.advance(Duration::from_secs(IMPORT_JOB_LIFETIME as u64));
    assert_eq!(
        e.import_job(&job.id).await.unwrap().state,
        ImportJobState::Expired
    );
    let err = e
        .import_version(import("signing", &job.id, good.clone()), "admin")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Precondition(_)), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    e.tick().await.unwrap();
    let swept = store.get_import_job(&job.id).await.unwrap().unwrap();
    assert_eq!(swept.state, ImportJobState::Expired);
    assert!(
        swept.private_ref.is_empty(),
        "the wrapping key outlived its job"
    );
    e.tick().await.unwrap();
    assert_eq!(expiries(e.audit()).await, 2, "both jobs are swept, once");
    assert_eq!(versions(&e, "signing"), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_job_whose_wrapping_key_will_not_go_holds_back_no_destruction_and_is_retried() {
    use super::VersionAction;
    use super::model::{Custody, ImportJob, VersionState};
    let (dir, _, store) = crate::datastore::scratch_sqlite("importsweep").await;
    let store: Arc<dyn DataStore> = Arc::new(store);
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let audit = Audit::scratch(store.clone(), clock.clone()).await;
    let keys = Arc::new(super::tests::FlakyKek::default());
    let e = Engines::load(
        TrustDomain::new("example.org").unwrap(),
        store.clone(),
        keys.clone(),
        clock.clone(),
        audit.clone(),
    )
    .await
    .unwrap();
    e.create_engine("vault", 1, None, None, false, "admin")
        .await
        .unwrap();
    e.create_key("vault", "signing", Purpose::Sign, None, 0, 10, "admin")
        .await
        .unwrap();
    e.rotate("vault", "signing", "admin").await.unwrap();
    // A job of an hsm-custody Engine whose token will not destroy its wrapping key, and a
    // version whose destruction falls due at the same tick.
    let now = continuity_common::Clock::unix(&*clock);
    let stuck = ImportJob {
        id: "ij-00000000000000aa".into(),
        engine: "vault".into(),
        method: ImportMethod::RsaOaep3072Sha1Aes256,
        custody: Custody::Hsm,
        public_key: vec![1],
        private_ref: b"import-job/ij-00000000000000aa".to_vec(),
        state: ImportJobState::Active,
        created_at: now,
        expires_at: now + IMPORT_JOB_LIFETIME,
    };
    audit
        .commit(&[crate::datastore::Write::PutImportJob(stuck.clone())], &[])
        .await
        .unwrap();
    e.set_state("vault", "signing", 1, VersionAction::Destroy, "admin")
        .await
        .unwrap();
    keys.refuse_job_deletes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    clock.advance(Duration::from_secs(IMPORT_JOB_LIFETIME as u64));

    assert_eq!(e.tick().await.unwrap(), 1, "the due version is destroyed");
    let (_, versions) = e.key("vault", "signing").unwrap();
    assert_eq!(versions[0].state, VersionState::Destroyed);
    let held = store.get_import_job(&stuck.id).await.unwrap().unwrap();
    assert_eq!(
        held.state,
        ImportJobState::Active,
        "kept for the next sweep"
    );
    assert!(!held.private_ref.is_empty());

    // The token relents: the next tick expires the job, once.
    keys.refuse_job_deletes
        .store(false, std::sync::atomic::Ordering::SeqCst);
    e.tick().await.unwrap();
    e.tick().await.unwrap();
    let swept = store.get_import_job(&stuck.id).await.unwrap().unwrap();
    assert_eq!(swept.state, ImportJobState::Expired);
    assert!(swept.private_ref.is_empty());
    assert_eq!(expiries(&audit).await, 1);
    let _ = std::fs::remove_dir_all(dir);
}
