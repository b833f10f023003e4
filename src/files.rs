//! Reading the files that a config names, with a bound on what one read may take.

use std::io::{self, Read as _};
use std::path::Path;

/// Largest config, managed devices or device profile file read. A config of 10,000
/// devices takes a few megabytes.
pub const MAX_CONFIG_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads `path` whole when it is a regular file of at most `max_bytes` bytes. A directory,
/// FIFO or device is rejected before it is opened: a FIFO would block until a writer
/// appears, a device such as `/dev/zero` never ends, and opening some devices, such as a
/// watchdog, acts on them. The file is then opened with `O_NONBLOCK` and its type read
/// again from the open file, so a path swapped for a FIFO in between fails at once.
pub fn read_limited(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = open_without_blocking(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    if metadata.len() > max_bytes {
        return Err(too_large(metadata.len(), max_bytes));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    // The file may have grown since its size was read.
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(too_large(read, max_bytes));
    }
    Ok(bytes)
}

/// Opens `path` for reading with `O_NONBLOCK`, which makes opening a FIFO return at once.
/// Reads from a regular file are not affected by the flag.
pub fn open_without_blocking(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Reads `path` as UTF-8 text, with the bounds of [`read_limited`].
pub fn read_text_limited(path: &Path, max_bytes: u64) -> io::Result<String> {
    String::from_utf8(read_limited(path, max_bytes)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (invalid byte at offset {}); save it as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Describes an error of [`read_limited`] or [`read_text_limited`] followed by its fix.
/// The errors these functions make themselves name their fix already.
pub fn with_fix(error: &io::Error) -> String {
    let fix = match error.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => return error.to_string(),
        io::ErrorKind::PermissionDenied => "let the user that runs Stonelion read it",
        _ => "check the path",
    };
    format!("{error}; {fix}")
}

fn not_regular() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "it is not a regular file (a directory, FIFO or device); name a regular file",
    )
}

fn too_large(size: u64, max_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "it has {size} bytes or more, over the limit of {max_bytes}; check that the path \
             names the intended file"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pem");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(read_limited(&path, 3).unwrap(), b"abc");
        let e = read_limited(&path, 2).unwrap_err();
        assert!(e.to_string().contains("over the limit of 2"), "{e}");
    }

    #[test]
    fn rejects_directories_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        for path in [dir.path(), Path::new("/dev/zero")] {
            let e = read_limited(path, 1024).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{}", path.display());
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn errors_end_with_one_fix() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(with_fix(&denied).ends_with("; let the user that runs Stonelion read it"));
        let missing = io::Error::from(io::ErrorKind::NotFound);
        assert!(with_fix(&missing).ends_with("; check the path"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.pem");
        std::fs::write(&path, b"abcd").unwrap();
        for e in [read_limited(dir.path(), 8), read_limited(&path, 2)] {
            let e = e.unwrap_err();
            assert_eq!(with_fix(&e), e.to_string());
            assert_eq!(e.to_string().matches("; ").count(), 1, "{e}");
        }
    }

    #[test]
    fn names_the_first_byte_that_is_not_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, b"a = 1\n\xff").unwrap();
        let e = read_text_limited(&path, 1024).unwrap_err();
        assert!(e.to_string().contains("offset 6"), "{e}");
    }
}
