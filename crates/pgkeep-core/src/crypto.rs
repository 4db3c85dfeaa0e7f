//! Client-side encryption of everything a repository stores but
//! `stanza.json`: WAL, backup files and manifests.
//!
//! - Cipher: XChaCha20-Poly1305 (AEAD), in the STREAM construction: the
//!   plaintext is cut into 64 KiB chunks, each sealed with the nonce
//!   `prefix (19 random bytes per object) | chunk counter (u32 BE) | last
//!   flag (1 byte)`, so chunks cannot be reordered, dropped or the object
//!   cut short without the tag check failing.
//! - Object layout: `PGKE` `1` (format), the 19-byte prefix, then the
//!   sealed chunks (plaintext length + 16-byte tag each). Encryption wraps
//!   the compressed stream.
//! - Key: BLAKE3 in key-derivation mode over the passphrase and a random
//!   per-stanza salt kept in `stanza.json`, with a key check value there
//!   too, so a wrong passphrase is a clear error, not a corrupt-object one.
//!   The derivation is fast (every `archive-push` runs it): use a long
//!   random passphrase, e.g. `openssl rand -base64 48`, not a word.
//! - The passphrase comes from the file named by `cipher-pass-file` or the
//!   `PGKEEP_CIPHER_PASS` variable and is never logged or stored.

use std::io::{self, Read, Write};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 5] = b"PGKE1";
const PREFIX: usize = 19;
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;

/// What `stanza.json` records of a repository's encryption.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CipherMeta {
    /// Always `xchacha20-poly1305`.
    pub algorithm: String,
    /// Random salt of the key derivation, hex.
    pub salt: String,
    /// Keyed hash proving the passphrase, hex.
    pub check: String,
}

/// The repository's key.
#[derive(Clone)]
pub struct Cipher {
    key: [u8; 32],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    fn derive(passphrase: &[u8], salt: &[u8]) -> Cipher {
        let mut material = Vec::with_capacity(passphrase.len() + salt.len() + 8);
        material.extend_from_slice(&(salt.len() as u64).to_le_bytes());
        material.extend_from_slice(salt);
        material.extend_from_slice(passphrase);
        Cipher { key: blake3::derive_key("pgkeep 2026-11 repository key v1", &material) }
    }

    fn check_value(&self) -> String {
        blake3::keyed_hash(&self.key, b"pgkeep key check").to_hex().to_string()
    }

    /// A new key for a new stanza: returns it and what `stanza.json` keeps.
    pub fn create(passphrase: &[u8]) -> Result<(Cipher, CipherMeta)> {
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt).map_err(|e| Error::Input(format!("no random numbers from the system: {e}")))?;
        let c = Cipher::derive(passphrase, &salt);
        let meta = CipherMeta { algorithm: "xchacha20-poly1305".into(), salt: hex(&salt), check: c.check_value() };
        Ok((c, meta))
    }

    /// Opens the key of an existing stanza; a wrong passphrase is refused.
    pub fn open(passphrase: &[u8], meta: &CipherMeta, what: &str) -> Result<Cipher> {
        if meta.algorithm != "xchacha20-poly1305" {
            return Err(Error::Refused(format!("{what} is encrypted with {}, which this pgkeep does not know", meta.algorithm)));
        }
        let salt = unhex(&meta.salt).ok_or_else(|| Error::Corrupt(format!("{what}: the encryption salt is damaged")))?;
        let c = Cipher::derive(passphrase, &salt);
        if c.check_value() != meta.check {
            return Err(Error::Input(format!("the passphrase does not open {what}; check cipher-pass-file or PGKEEP_CIPHER_PASS")));
        }
        Ok(c)
    }

    /// A keyed checksum, so that names of stored objects say nothing of
    /// their content to whoever cannot decrypt it.
    pub fn keyed_hash(&self, data: &[u8]) -> String {
        blake3::keyed_hash(&self.key, data).to_hex().to_string()
    }

    fn aead(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key).into())
    }

    /// Encrypts a whole buffer.
    pub fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        let mut w = self.encryptor(Vec::with_capacity(data.len() + data.len() / CHUNK * TAG + 64))?;
        w.write_all(data).map_err(Error::io("cannot encrypt"))?;
        w.finish().map_err(Error::io("cannot encrypt"))
    }

    /// Decrypts a whole buffer; `what` names it in errors.
    pub fn open_bytes(&self, data: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len());
        self.decryptor(data)
            .and_then(|mut r| r.read_to_end(&mut out))
            .map_err(|e| Error::Corrupt(format!("{what} cannot be decrypted ({e}): it is corrupt, truncated or not of this repository")))?;
        Ok(out)
    }

    /// Wraps `inner` in a streaming encryptor; call [`Encryptor::finish`].
    pub fn encryptor<W: Write>(&self, mut inner: W) -> Result<Encryptor<W>> {
        let mut prefix = [0u8; PREFIX];
        getrandom::fill(&mut prefix).map_err(|e| Error::Input(format!("no random numbers from the system: {e}")))?;
        inner.write_all(MAGIC).and_then(|_| inner.write_all(&prefix)).map_err(Error::io("cannot encrypt"))?;
        Ok(Encryptor { inner, aead: self.aead(), prefix, counter: 0, buf: Vec::with_capacity(CHUNK) })
    }

    /// Wraps `inner` in a streaming decryptor.
    pub fn decryptor<R: Read>(&self, mut inner: R) -> io::Result<Decryptor<R>> {
        let mut head = [0u8; MAGIC.len() + PREFIX];
        inner.read_exact(&mut head).map_err(|_| bad("too short to be encrypted"))?;
        if &head[..MAGIC.len()] != MAGIC {
            return Err(bad("not encrypted by pgkeep"));
        }
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&head[MAGIC.len()..]);
        Ok(Decryptor { inner, aead: self.aead(), prefix, counter: 0, plain: Vec::new(), pos: 0, done: false, ahead: None })
    }
}

fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[23] = u8::from(last);
    n.into()
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

/// Streaming encryptor (see the module documentation).
pub struct Encryptor<W: Write> {
    inner: W,
    aead: XChaCha20Poly1305,
    prefix: [u8; PREFIX],
    counter: u32,
    buf: Vec<u8>,
}

impl<W: Write> Encryptor<W> {
    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last);
        let sealed = self.aead.encrypt(&n, Payload { msg: &self.buf, aad: MAGIC }).map_err(|_| bad("encryption failed"))?;
        self.counter = self.counter.checked_add(1).ok_or_else(|| bad("object too large to encrypt"))?;
        self.buf.clear();
        self.inner.write_all(&sealed)
    }

    /// Seals the last chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only once more data comes: only then is
        // it known not to be the last.
        if self.buf.len() == CHUNK && !data.is_empty() {
            self.seal_chunk(false)?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streaming decryptor (see the module documentation).
pub struct Decryptor<R: Read> {
    inner: R,
    aead: XChaCha20Poly1305,
    prefix: [u8; PREFIX],
    counter: u32,
    plain: Vec<u8>,
    pos: usize,
    done: bool,
    /// One byte read past a full chunk, to learn whether it was the last.
    ahead: Option<u8>,
}

impl<R: Read> Decryptor<R> {
    fn next_chunk(&mut self) -> io::Result<()> {
        let mut sealed = Vec::with_capacity(CHUNK + TAG);
        if let Some(b) = self.ahead.take() {
            sealed.push(b);
        }
        (&mut self.inner).take((CHUNK + TAG - sealed.len()) as u64).read_to_end(&mut sealed)?;
        let mut one = [0u8; 1];
        let last = sealed.len() < CHUNK + TAG || self.inner.read(&mut one)? == 0;
        if !last {
            self.ahead = Some(one[0]);
        }
        if sealed.len() < TAG {
            return Err(bad("encrypted object is truncated"));
        }
        let n = nonce(&self.prefix, self.counter, last);
        self.plain = self
            .aead
            .decrypt(&n, Payload { msg: &sealed, aad: MAGIC })
            .map_err(|_| bad("authentication failed: the object is corrupt, truncated or encrypted with another key"))?;
        self.counter += 1;
        self.pos = 0;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A writer that encrypts when the repository is encrypted.
pub enum Sealing<W: Write> {
    /// Not encrypted.
    Plain(W),
    /// Encrypted.
    Sealed(Encryptor<W>),
}

impl<W: Write> Sealing<W> {
    /// Wraps `w` for `cipher`.
    pub fn new(cipher: Option<&Cipher>, w: W) -> Result<Self> {
        Ok(match cipher {
            Some(c) => Sealing::Sealed(c.encryptor(w)?),
            None => Sealing::Plain(w),
        })
    }

    /// Ends the stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealing::Plain(w) => Ok(w),
            Sealing::Sealed(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Plain(w) => w.write(buf),
            Sealing::Sealed(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Plain(w) => w.flush(),
            Sealing::Sealed(e) => e.flush(),
        }
    }
}

/// A reader that decrypts when the repository is encrypted.
pub fn unsealing<'a, R: Read + Send + 'a>(cipher: Option<&Cipher>, r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match cipher {
        Some(c) => Box::new(c.decryptor(r)?),
        None => Box::new(r),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    s.len().is_multiple_of(2).then_some(())?;
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length_and_refuses_tampering() {
        let (c, meta) = Cipher::create(b"correct horse").unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = c.seal(&data).unwrap();
            assert_eq!(c.open_bytes(&sealed, "x").unwrap(), data, "length {len}");
            if len >= 32 {
                assert!(!sealed.windows(32).any(|w| w == &data[..32]), "plaintext visible at length {len}");
            }
            let mut flipped = sealed.clone();
            let at = flipped.len() - 1;
            flipped[at] ^= 1;
            assert!(c.open_bytes(&flipped, "x").is_err(), "flipped byte accepted at length {len}");
            // Cut at a chunk boundary: the last-chunk flag catches it.
            if len > CHUNK {
                let cut = &sealed[..MAGIC.len() + PREFIX + CHUNK + TAG];
                assert!(c.open_bytes(cut, "x").is_err(), "truncation accepted at length {len}");
            }
        }
        let other = Cipher::open(b"correct horse", &meta, "repo 1").unwrap();
        assert_eq!(other.open_bytes(&c.seal(b"abc").unwrap(), "x").unwrap(), b"abc");
        let e = Cipher::open(b"wrong", &meta, "repo 1").unwrap_err().to_string();
        assert!(e.contains("passphrase does not open repo 1"), "{e}");
        let (c2, _) = Cipher::create(b"correct horse").unwrap();
        assert!(c2.open_bytes(&c.seal(b"abc").unwrap(), "x").is_err(), "another salt, another key");
    }
}
