//! Files the configuration names (a prices file, a token file): read whole at start, so
//! bounded in time and bytes whatever is at the path.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// The contents of the regular file at `path`, at most `max_bytes` of it.
///
/// # Errors
///
/// The open's or read's error; one saying so when the path is not a regular file (a FIFO
/// or a device could block the start, or never end), or the file is larger than
/// `max_bytes`. A FIFO is refused without waiting for a writer.
pub(crate) fn read_regular(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let file = open_without_blocking(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::other(format!("larger than {}", in_units(max_bytes))));
    }
    Ok(bytes)
}

/// `bytes` in the largest binary unit that divides it.
fn in_units(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".to_owned(),
        _ if bytes.is_multiple_of(1 << 20) => format!("{} MiB", bytes >> 20),
        _ if bytes.is_multiple_of(1 << 10) => format!("{} KiB", bytes >> 10),
        _ => format!("{bytes} bytes"),
    }
}

/// Opens `path` to read; on Unix with `O_NONBLOCK`, so that opening a FIFO returns at once.
/// Reads of a regular file ignore the flag.
fn open_without_blocking(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::read_regular;

    #[test]
    fn a_small_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"s3cret\n").unwrap();
        assert_eq!(read_regular(&path, 7).unwrap(), b"s3cret\n");
        let error = read_regular(&path, 6).unwrap_err();
        assert_eq!(error.to_string(), "larger than 6 bytes");
        std::fs::write(&path, vec![b'x'; 2048]).unwrap();
        assert_eq!(read_regular(&path, 1024).unwrap_err().to_string(), "larger than 1 KiB");
    }

    #[test]
    fn what_is_not_a_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_regular(dir.path(), 1024).unwrap_err().to_string(),
            "not a regular file"
        );
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
            assert!(made.success());
            // No writer: a blocking open would wait here for ever.
            assert_eq!(read_regular(&fifo, 1024).unwrap_err().to_string(), "not a regular file");
            let endless = std::path::Path::new("/dev/zero");
            assert_eq!(
                read_regular(endless, 1024).unwrap_err().to_string(),
                "not a regular file"
            );
        }
    }
}
