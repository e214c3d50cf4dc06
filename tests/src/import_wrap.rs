//! Key material for import tests, made and wrapped with the openssl CLI only (never the
//! server's code): a P-256 key as PKCS#8 DER, a raw AES-256 key, and the Cloud KMS
//! `RSA_OAEP_3072_SHA256_AES_256` / `RSA_OAEP_3072_SHA1_AES_256` blob
//! `RSA-OAEP(ephemeral) || KWP(ephemeral, material)`.

use std::path::Path;
use std::process::Command;

/// Runs openssl with `args`; its stdout, or an error naming the command and its stderr.
fn openssl(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("openssl").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Writes a fresh P-256 key made by openssl into `dir` (`ec.der`, PKCS#8 DER; `ec.pub.pem`,
/// its SPKI PEM); returns the DER.
pub fn p256_pkcs8(dir: &Path) -> anyhow::Result<Vec<u8>> {
    // genpkey's DER is SEC1 (ECPrivateKey); `pkcs8 -topk8` makes the PKCS#8 import takes.
    let pem = dir.join("ec.pem");
    let p = pem.to_str().unwrap_or_default();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        p,
    ])?;
    let der = dir.join("ec.der");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        p,
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap_or_default(),
    ])?;
    openssl(&[
        "pkey",
        "-in",
        p,
        "-pubout",
        "-out",
        dir.join("ec.pub.pem").to_str().unwrap_or_default(),
    ])?;
    Ok(std::fs::read(der)?)
}

/// 32 random bytes from openssl (an AES-256 key).
pub fn aes256() -> anyhow::Result<Vec<u8>> {
    let key = openssl(&["rand", "32"])?;
    anyhow::ensure!(key.len() == 32, "openssl rand gave {} bytes", key.len());
    Ok(key)
}

/// Wraps `material` for the job whose public key (SPKI PEM) is `job_pem` with import method
/// `method`, in `dir`: a fresh ephemeral AES-256 key under RSA-OAEP (SHA-256 or SHA-1 as the
/// method says, MGF1 of the same hash), then the material under AES key wrap with padding
/// (RFC 5649).
pub fn wrap(dir: &Path, job_pem: &str, material: &[u8], method: &str) -> anyhow::Result<Vec<u8>> {
    let md = match method {
        "RSA_OAEP_3072_SHA256_AES_256" => "sha256",
        "RSA_OAEP_3072_SHA1_AES_256" => "sha1",
        o => anyhow::bail!("import method {o:?}"),
    };
    let (oaep_md, mgf1_md) = (format!("rsa_oaep_md:{md}"), format!("rsa_mgf1_md:{md}"));
    let pem = dir.join("job.pem");
    std::fs::write(&pem, job_pem)?;
    let eph = dir.join("eph.bin");
    std::fs::write(&eph, aes256()?)?;
    let part1 = openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        pem.to_str().unwrap_or_default(),
        "-in",
        eph.to_str().unwrap_or_default(),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        &oaep_md,
        "-pkeyopt",
        &mgf1_md,
    ])?;
    let hex: String = std::fs::read(&eph)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mat = dir.join("material.bin");
    std::fs::write(&mat, material)?;
    let part2 = openssl(&[
        "enc",
        "-id-aes256-wrap-pad",
        "-K",
        &hex,
        "-iv",
        "A65959A6",
        "-in",
        mat.to_str().unwrap_or_default(),
    ])?;
    std::fs::remove_file(&eph)?;
    std::fs::remove_file(&mat)?;
    anyhow::ensure!(part1.len() == 384, "RSA-OAEP part is {} bytes", part1.len());
    Ok([part1, part2].concat())
}
