//! Files, before they leave the device: compressed when that helps, then encrypted with
//! a fresh random key, so the server only ever stores opaque blobs.
//!
//! Encryption is XChaCha20-Poly1305 in the STREAM construction (`aead::stream`, big-endian
//! 32-bit counter): the file is cut into 256 KiB pieces, each sealed with its own nonce
//! and the last one marked, so a truncated, reordered or altered blob fails to decrypt,
//! and neither side ever holds more than a piece. The key, the nonce prefix, the SHA-256
//! of the ciphertext and the file's name travel inside the end-to-end encrypted message
//! ([`MediaDescriptor`]).
//!
//! Compression: documents go through zstd when that makes them smaller; images are
//! re-encoded at most 1600 px on the long side, with a small JPEG thumbnail for the
//! message itself.
//!
//! A descriptor comes from the sender, so none of its numbers is trusted: its sizes must
//! be within [`FILE_MAX_BYTES`] before anything is fetched, the blob must be exactly
//! `size` bytes, and a zstd file is decompressed only up to the `original_size` it
//! declared (a decompression bomb stops there, [`FileError::UnpacksBeyond`]).

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256};

use crate::{ClientError, CryptoError, FileError};

/// The largest file this SDK sends or accepts, sealed or unpacked: `ternd`'s default
/// `--media-max-bytes` (100 MiB), the server's file limit. A descriptor declaring more
/// is refused before a byte is fetched.
pub const FILE_MAX_BYTES: u64 = 100 << 20;

/// Plaintext bytes per sealed piece.
pub const PIECE_BYTES: usize = 256 * 1024;
/// Bytes a sealed piece adds (the Poly1305 tag).
const TAG_BYTES: usize = 16;
/// The long side of a sent image, at most.
pub const IMAGE_MAX_SIDE: u32 = 1600;
/// The long side of a thumbnail.
pub const THUMBNAIL_SIDE: u32 = 64;

/// How the plaintext was transformed before encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// As is.
    Raw = 0,
    /// zstd-compressed.
    Zstd = 1,
    /// An image re-encoded (JPEG or PNG, smaller).
    Image = 2,
}

/// What a recipient needs to fetch and open a file: sent inside the E2E message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaDescriptor {
    /// The blob on the server.
    pub media_id: [u8; 16],
    /// The file key.
    pub key: [u8; 32],
    /// The STREAM nonce prefix.
    pub nonce: [u8; 19],
    /// SHA-256 of the ciphertext (checked by the server at upload and by the recipient).
    pub sha256: [u8; 32],
    /// Ciphertext bytes.
    pub size: u64,
    /// The file's own size, before packing (0 from senders that did not say).
    pub original_size: u64,
    /// How the plaintext was packed.
    pub packing: Packing,
    /// The file's name.
    pub name: String,
    /// A small JPEG preview, for images.
    pub thumbnail: Vec<u8>,
}

/// In a descriptor's packing byte: the original size follows the name.
const ORIGINAL_SIZE_FLAG: u8 = 0x80;

impl MediaDescriptor {
    /// Serializes for the E2E message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            16 + 32 + 19 + 32 + 8 + 1 + 4 + self.name.len() + self.thumbnail.len(),
        );
        out.extend_from_slice(&self.media_id);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.size.to_le_bytes());
        // The high bit says the original size follows the name (older descriptors
        // lack it; they still decode).
        out.push(self.packing as u8 | ORIGINAL_SIZE_FLAG);
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.original_size.to_le_bytes());
        out.extend_from_slice(&self.thumbnail);
        out
    }

    /// Parses what [`MediaDescriptor::encode`] made.
    pub fn decode(bytes: &[u8]) -> Result<MediaDescriptor, CryptoError> {
        let bad = || CryptoError::Decrypt("a malformed media descriptor".into());
        if bytes.len() < 110 {
            return Err(bad());
        }
        let take = |from: usize, len: usize| &bytes[from..from + len];
        let name_len = u16::from_le_bytes(take(108, 2).try_into().expect("2")) as usize;
        if bytes.len() < 110 + name_len {
            return Err(bad());
        }
        let with_size = bytes[107] & ORIGINAL_SIZE_FLAG != 0;
        let rest = 110 + name_len;
        if with_size && bytes.len() < rest + 8 {
            return Err(bad());
        }
        let (original_size, thumbnail_at) = match with_size {
            true => (u64::from_le_bytes(take(rest, 8).try_into().expect("8")), rest + 8),
            false => (0, rest),
        };
        let packing = match bytes[107] & !ORIGINAL_SIZE_FLAG {
            0 => Packing::Raw,
            1 => Packing::Zstd,
            2 => Packing::Image,
            _ => return Err(bad()),
        };
        Ok(MediaDescriptor {
            media_id: take(0, 16).try_into().expect("16"),
            key: take(16, 32).try_into().expect("32"),
            nonce: take(48, 19).try_into().expect("19"),
            sha256: take(67, 32).try_into().expect("32"),
            size: u64::from_le_bytes(take(99, 8).try_into().expect("8")),
            original_size,
            packing,
            name: String::from_utf8(take(110, name_len).to_vec()).map_err(|_| bad())?,
            thumbnail: bytes[thumbnail_at..].to_vec(),
        })
    }
}

/// A file packed and sealed, ready to upload.
#[derive(Debug)]
pub struct SealedFile {
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
    /// Everything but the media id (known after the upload begins).
    pub descriptor: MediaDescriptor,
}

/// Packs (compresses) and seals a file's bytes with a fresh key.
pub fn seal(name: &str, plaintext: &[u8]) -> Result<SealedFile, CryptoError> {
    let (packing, packed, thumbnail) = pack(name, plaintext);
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 19];
    getrandom::fill(&mut key).map_err(|e| CryptoError::BadKey(e.to_string()))?;
    getrandom::fill(&mut nonce).map_err(|e| CryptoError::BadKey(e.to_string()))?;
    let aead = XChaCha20Poly1305::new((&key).into());
    let mut encryptor = EncryptorBE32::from_aead(aead, (&nonce).into());
    let pieces: Vec<&[u8]> =
        if packed.is_empty() { vec![&[][..]] } else { packed.chunks(PIECE_BYTES).collect() };
    let (last, rest) = pieces.split_last().expect("at least one piece");
    let mut ciphertext = Vec::with_capacity(packed.len() + pieces.len() * TAG_BYTES);
    for piece in rest {
        ciphertext.extend(encryptor.encrypt_next(*piece).map_err(|_| sealing())?);
    }
    ciphertext.extend(encryptor.encrypt_last(*last).map_err(|_| sealing())?);
    let sha256: [u8; 32] = Sha256::digest(&ciphertext).into();
    let descriptor = MediaDescriptor {
        media_id: [0; 16],
        key,
        nonce,
        sha256,
        size: ciphertext.len() as u64,
        original_size: plaintext.len() as u64,
        packing,
        name: name.to_string(),
        thumbnail,
    };
    Ok(SealedFile { ciphertext, descriptor })
}

fn sealing() -> CryptoError {
    CryptoError::Decrypt("sealing failed".into())
}

impl MediaDescriptor {
    /// Checks the sender's numbers against the file limit: the sealed size and the
    /// declared original size are each at most [`FILE_MAX_BYTES`].
    pub fn check(&self) -> Result<(), FileError> {
        for size_bytes in [self.size, self.original_size] {
            if size_bytes > FILE_MAX_BYTES {
                return Err(FileError::TooLarge { size_bytes, max_bytes: FILE_MAX_BYTES });
            }
        }
        Ok(())
    }
}

/// Checks, opens and unpacks a downloaded blob: the descriptor's sizes within the limit,
/// the blob exactly its declared size and hash, decompression bounded by the declared
/// original size.
pub fn open(descriptor: &MediaDescriptor, ciphertext: &[u8]) -> Result<Vec<u8>, ClientError> {
    descriptor.check()?;
    if ciphertext.len() as u64 != descriptor.size {
        let (declared_bytes, actual_bytes) = (descriptor.size, ciphertext.len() as u64);
        return Err(FileError::SizeMismatch { declared_bytes, actual_bytes }.into());
    }
    let sha256: [u8; 32] = Sha256::digest(ciphertext).into();
    if sha256 != descriptor.sha256 {
        return Err(CryptoError::Decrypt("the file's hash does not match".into()).into());
    }
    let aead = XChaCha20Poly1305::new((&descriptor.key).into());
    let mut decryptor = DecryptorBE32::from_aead(aead, (&descriptor.nonce).into());
    let tampered = || CryptoError::Decrypt("the file was altered or truncated".into());
    let pieces: Vec<&[u8]> = ciphertext.chunks(PIECE_BYTES + TAG_BYTES).collect();
    let (last, rest) = pieces.split_last().ok_or_else(tampered)?;
    let mut packed = Vec::with_capacity(ciphertext.len());
    for piece in rest {
        packed.extend(decryptor.decrypt_next(*piece).map_err(|_| tampered())?);
    }
    packed.extend(decryptor.decrypt_last(*last).map_err(|_| tampered())?);
    match descriptor.packing {
        Packing::Raw | Packing::Image => Ok(packed),
        Packing::Zstd => unpack_bounded(&packed, descriptor.original_size),
    }
}

/// Decompresses a zstd file, never past the size its sender declared (0, from senders
/// that did not say: the file limit), and checks it is exactly that size. The output
/// grows with what really decompresses; the declared number sizes no allocation.
fn unpack_bounded(packed: &[u8], original_size: u64) -> Result<Vec<u8>, ClientError> {
    use std::io::Read;
    let bound_bytes = if original_size == 0 { FILE_MAX_BYTES } else { original_size };
    let decoder = zstd::stream::read::Decoder::new(packed)
        .map_err(|e| CryptoError::Decrypt(format!("cannot decompress: {e}")))?;
    let mut unpacked = Vec::new();
    // One byte past the bound tells "more than declared" without reading further.
    decoder
        .take(bound_bytes + 1)
        .read_to_end(&mut unpacked)
        .map_err(|e| CryptoError::Decrypt(format!("cannot decompress: {e}")))?;
    let actual_bytes = unpacked.len() as u64;
    if actual_bytes > bound_bytes {
        return Err(FileError::UnpacksBeyond { bound_bytes }.into());
    }
    if original_size != 0 && actual_bytes != original_size {
        let declared_bytes = original_size;
        return Err(FileError::SizeMismatch { declared_bytes, actual_bytes }.into());
    }
    Ok(unpacked)
}

/// Chooses how to pack a file: images re-encoded smaller with a thumbnail, other files
/// zstd-compressed when that saves at least a tenth.
fn pack(name: &str, plaintext: &[u8]) -> (Packing, Vec<u8>, Vec<u8>) {
    if let Some((image, thumbnail)) = shrink_image(plaintext) {
        return (Packing::Image, image, thumbnail);
    }
    let _ = name;
    if let Ok(compressed) = zstd::encode_all(plaintext, 3) {
        if compressed.len() < plaintext.len() - plaintext.len() / 10 {
            return (Packing::Zstd, compressed, Vec::new());
        }
    }
    (Packing::Raw, plaintext.to_vec(), Vec::new())
}

/// An image (PNG or JPEG) re-encoded as JPEG at most [`IMAGE_MAX_SIDE`] on its long side,
/// and a thumbnail; `None` if the bytes are not an image this client reads.
fn shrink_image(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let format = image::guess_format(bytes).ok()?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return None;
    }
    let picture = image::load_from_memory_with_format(bytes, format).ok()?;
    let resized = if picture.width().max(picture.height()) > IMAGE_MAX_SIDE {
        picture.resize(IMAGE_MAX_SIDE, IMAGE_MAX_SIDE, image::imageops::FilterType::Triangle)
    } else {
        picture.clone()
    };
    let jpeg = |img: &image::DynamicImage, quality: u8| -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        img.to_rgb8().write_with_encoder(encoder).ok()?;
        Some(out)
    };
    let thumb = picture.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE);
    let thumbnail = jpeg(&thumb, 60)?;
    let too_big = picture.width().max(picture.height()) > IMAGE_MAX_SIDE;
    // The smaller of JPEG and PNG; an image that needed no downscaling is kept as it is
    // unless that is smaller still.
    let mut png = Vec::new();
    resized.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).ok()?;
    let full = jpeg(&resized, 85)?;
    let best = if png.len() < full.len() { png } else { full };
    let image = if too_big || best.len() < bytes.len() { best } else { bytes.to_vec() };
    Some((image, thumbnail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_file_opens_only_whole_and_unaltered() {
        let mut text = vec![0u8; 700_000];
        getrandom::fill(&mut text).unwrap(); // Incompressible: stored raw, three pieces.
        let sealed = seal("notes.bin", &text).unwrap();
        assert_eq!(sealed.descriptor.packing, Packing::Raw);
        assert_eq!(open(&sealed.descriptor, &sealed.ciphertext).unwrap(), text);
        // Altered.
        let mut altered = sealed.ciphertext.clone();
        altered[10] ^= 1;
        let mut descriptor = sealed.descriptor.clone();
        descriptor.sha256 = Sha256::digest(&altered).into();
        assert!(open(&descriptor, &altered).is_err());
        // Truncated at a piece boundary (the last-piece flag is missing).
        let cut = sealed.ciphertext[..PIECE_BYTES + TAG_BYTES].to_vec();
        descriptor.sha256 = Sha256::digest(&cut).into();
        descriptor.size = cut.len() as u64;
        assert!(open(&descriptor, &cut).is_err());
        // The descriptor survives its encoding.
        let back = MediaDescriptor::decode(&sealed.descriptor.encode()).unwrap();
        assert_eq!(back, sealed.descriptor);
    }

    /// A hostile sender seals 64 MiB of zeros (a few KiB of zstd) and declares 1 KiB:
    /// opening stops decompressing at the declared size and names the rule; a
    /// descriptor declaring more than the file limit is refused before anything else.
    /// (Before: `zstd::decode_all` unpacked whatever the blob held.)
    #[test]
    fn a_decompression_bomb_stops_at_the_declared_size() {
        let zeros = vec![0u8; 64 << 20];
        let mut sealed = seal("bomb.txt", &zeros).unwrap();
        assert_eq!(sealed.descriptor.packing, Packing::Zstd);
        assert!(sealed.ciphertext.len() < 64 << 10, "{}", sealed.ciphertext.len());
        sealed.descriptor.original_size = 1024;
        let opened = open(&sealed.descriptor, &sealed.ciphertext);
        let refusal = FileError::UnpacksBeyond { bound_bytes: 1024 };
        assert!(
            matches!(opened, Err(ClientError::File(e)) if e == refusal),
            "{:?}",
            opened.map(|v| v.len())
        );
        // Declaring more than the limit is refused as such.
        sealed.descriptor.original_size = FILE_MAX_BYTES + 1;
        let opened = open(&sealed.descriptor, &sealed.ciphertext);
        let too_large =
            FileError::TooLarge { size_bytes: FILE_MAX_BYTES + 1, max_bytes: FILE_MAX_BYTES };
        assert!(
            matches!(opened, Err(ClientError::File(e)) if e == too_large),
            "{:?}",
            opened.map(|v| v.len())
        );
        // Declaring nothing (an older sender) bounds it by the limit; a smaller
        // declared size than the truth is a mismatch, never a silent truncation.
        let small = seal("small.txt", &vec![7u8; 10_000]).unwrap();
        let mut descriptor = small.descriptor.clone();
        descriptor.original_size = 0;
        assert_eq!(open(&descriptor, &small.ciphertext).unwrap().len(), 10_000);
        descriptor.original_size = 20_000;
        let opened = open(&descriptor, &small.ciphertext);
        let mismatch = FileError::SizeMismatch { declared_bytes: 20_000, actual_bytes: 10_000 };
        assert!(
            matches!(opened, Err(ClientError::File(e)) if e == mismatch),
            "{:?}",
            opened.map(|v| v.len())
        );
    }

    #[test]
    fn compressible_files_shrink_and_images_are_downscaled_with_a_thumbnail() {
        let repetitive = b"tern ".repeat(100_000);
        let sealed = seal("log.txt", &repetitive).unwrap();
        assert_eq!(sealed.descriptor.packing, Packing::Zstd);
        assert!(sealed.ciphertext.len() < repetitive.len() / 10);
        assert_eq!(open(&sealed.descriptor, &sealed.ciphertext).unwrap(), repetitive);

        let big = image::RgbImage::from_fn(3000, 2000, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 99])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(big)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let sealed = seal("photo.png", &png).unwrap();
        assert_eq!(sealed.descriptor.packing, Packing::Image);
        let opened = open(&sealed.descriptor, &sealed.ciphertext).unwrap();
        let shown = image::load_from_memory(&opened).unwrap();
        assert_eq!((shown.width(), shown.height()), (1600, 1067));
        let thumb = image::load_from_memory(&sealed.descriptor.thumbnail).unwrap();
        assert!(thumb.width() <= THUMBNAIL_SIDE && thumb.height() <= THUMBNAIL_SIDE);
    }
}
