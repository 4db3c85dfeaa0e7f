//! Compression of stored objects, as streaming `Write` encoders and `Read`
//! decoders so that no whole file is ever held in memory.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// A compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Zstandard (the default).
    #[default]
    Zstd,
    /// LZ4 frame format.
    Lz4,
    /// gzip.
    Gzip,
    /// Stored as is.
    None,
}

impl Compress {
    /// The file name extension of objects compressed this way ("" for none).
    pub fn extension(self) -> &'static str {
        match self {
            Compress::Zstd => ".zst",
            Compress::Lz4 => ".lz4",
            Compress::Gzip => ".gz",
            Compress::None => "",
        }
    }

    /// Wraps `w` in an encoder. `level` is codec-specific; `None` picks a
    /// fast default (zstd 3, gzip 6; lz4 has no levels).
    pub fn encoder<W: Write + Send + 'static>(self, w: W, level: Option<i32>) -> io::Result<Encoder<'static, W>> {
        Ok(match self {
            Compress::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, level.unwrap_or(3))?),
            Compress::Lz4 => Encoder::Lz4(lz4_flex::frame::FrameEncoder::new(w)),
            Compress::Gzip => {
                let level = level.unwrap_or(6).clamp(0, 9) as u32;
                Encoder::Gzip(flate2::write::GzEncoder::new(w, flate2::Compression::new(level)))
            }
            Compress::None => Encoder::None(w),
        })
    }

    /// As [`Compress::encoder`], with the compression context kept in
    /// `contexts` and reused from one stream to the next: for a small
    /// file, creating and clearing a zstd context costs more than
    /// compressing it. The streams are the same as [`Compress::encoder`]'s.
    pub fn encoder_in<'a, W: Write + Send + 'static>(
        self,
        w: W,
        level: Option<i32>,
        contexts: &'a mut Contexts,
    ) -> io::Result<Encoder<'a, W>> {
        match self {
            Compress::Zstd => {
                let cctx = contexts.zstd.get_or_insert_with(zstd::zstd_safe::CCtx::create);
                cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level.unwrap_or(3)))
                    .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
                Ok(Encoder::Zstd(zstd::stream::write::Encoder::with_context(w, cctx)))
            }
            other => other.encoder(w, level),
        }
    }

    /// As [`Compress::decoder`], with the decompression context kept in
    /// `contexts` and reused from one stream to the next.
    pub fn decoder_in<'a, R: Read + Send + 'a>(self, r: R, contexts: &'a mut Contexts) -> io::Result<Box<dyn Read + Send + 'a>> {
        match self {
            Compress::Zstd => {
                let dctx = contexts.zstd_d.get_or_insert_with(zstd::zstd_safe::DCtx::create);
                let buffered = io::BufReader::with_capacity(zstd::zstd_safe::DCtx::in_size(), r);
                Ok(Box::new(zstd::stream::read::Decoder::with_context(buffered, dctx)))
            }
            other => other.decoder(r),
        }
    }

    /// Wraps `r` in the matching decoder.
    pub fn decoder<'a, R: Read + Send + 'a>(self, r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compress::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
            Compress::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(r)),
            Compress::Gzip => Box::new(flate2::read::GzDecoder::new(r)),
            Compress::None => Box::new(r),
        })
    }
}

/// Compression contexts one thread keeps between streams (see
/// [`Compress::encoder_in`]); created on first use.
#[derive(Default)]
pub struct Contexts {
    zstd: Option<zstd::zstd_safe::CCtx<'static>>,
    zstd_d: Option<zstd::zstd_safe::DCtx<'static>>,
}

/// A streaming encoder; call [`Encoder::finish`] to write the trailer.
/// `'a` is the borrow of the [`Contexts`] it compresses with, if any.
pub enum Encoder<'a, W: Write> {
    /// zstd
    Zstd(zstd::stream::write::Encoder<'a, W>),
    /// lz4
    Lz4(lz4_flex::frame::FrameEncoder<W>),
    /// gzip
    Gzip(flate2::write::GzEncoder<W>),
    /// no compression
    None(W),
}

impl<W: Write> Encoder<'_, W> {
    /// Ends the stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Lz4(e) => e.finish().map_err(io::Error::other),
            Encoder::Gzip(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Lz4(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Lz4(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

/// Compresses a whole buffer (small objects: WAL, metadata).
pub fn compress_bytes(c: Compress, level: Option<i32>, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut e = c.encoder(Vec::with_capacity(data.len() / 2 + 64), level)?;
    e.write_all(data)?;
    e.finish()
}

/// Decompresses a whole buffer, refusing output larger than `limit`.
pub fn decompress_bytes(c: Compress, data: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    c.decoder(data)?.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "decompressed data is larger than expected"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reused context gives the same stream as a fresh one, whatever the
    /// previous stream left in it (finished, or dropped half way).
    #[test]
    fn a_reused_context_compresses_as_a_fresh_one() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 253).to_le_bytes()).collect();
        let mut contexts = Contexts::default();
        for c in [Compress::Zstd, Compress::Lz4, Compress::Gzip, Compress::None] {
            for level in [None, Some(1), Some(9)] {
                let fresh = compress_bytes(c, level, &data).unwrap();
                let mut half = c.encoder_in(Vec::new(), level, &mut contexts).unwrap();
                half.write_all(&data[..100_000]).unwrap();
                drop(half);
                let mut e = c.encoder_in(Vec::new(), level, &mut contexts).unwrap();
                e.write_all(&data).unwrap();
                assert_eq!(e.finish().unwrap(), fresh, "{c:?} at {level:?}");
                // And the decoder's context likewise, after a stream read
                // half way.
                let mut half = vec![0u8; 1000];
                c.decoder_in(&fresh[..], &mut contexts).unwrap().read_exact(&mut half).unwrap();
                let mut back = Vec::new();
                c.decoder_in(&fresh[..], &mut contexts).unwrap().read_to_end(&mut back).unwrap();
                assert!(back == data, "{c:?} at {level:?} read back");
            }
        }
    }

    #[test]
    fn every_codec_round_trips_and_detects_truncation() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compress::Zstd, Compress::Lz4, Compress::Gzip, Compress::None] {
            let packed = compress_bytes(c, None, &data).unwrap();
            assert_eq!(decompress_bytes(c, &packed, data.len() as u64).unwrap(), data, "{c:?}");
            if c != Compress::None {
                assert!(packed.len() < data.len(), "{c:?} did not compress");
                let cut = &packed[..packed.len() / 2];
                let r = decompress_bytes(c, cut, data.len() as u64);
                assert!(r.is_err() || r.unwrap() != data, "{c:?} accepted a truncated stream");
            }
        }
    }
}
