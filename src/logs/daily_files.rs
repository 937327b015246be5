//! Daily log files `<prefix>.YYYY-MM-DD.log` (UTC dates) in one directory, written by the log
//! thread only.
//!
//! Contracts:
//! - lines never go through a symbolic link: today's file is opened with `O_NOFOLLOW`, and a
//!   symlink in its place is an error (counted and warned about by the writer's caller); its
//!   target is never touched, a dangling one never created;
//! - lines only go to a regular file: a FIFO or a device in its place is an error, a FIFO
//!   found without waiting for a reader (`O_NONBLOCK`);
//! - a line never runs into one cut short before: an existing file that does not end in `\n`
//!   (its writer killed mid-write, or stopped while the disk was full) gets one before the
//!   next line, written with it if the file still ends so then; a writer appending to the file
//!   at that moment may make it an empty line;
//! - lines never go to a file that is no longer at its path: before each batch the file at
//!   the path is compared (device and inode) with the one open, and reopened when they differ
//!   or it is gone (a removed directory or file comes back);
//! - files this crate creates get exactly the configured mode (default `0640`), directories
//!   it creates the same with search permission where read is granted (`0750`), whatever the
//!   umask; existing files and directories keep theirs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Daily files in `dir`.
pub(crate) struct DailyFiles {
    dir: PathBuf,
    prefix: String,
    file_mode: u32,
    open: Option<OpenFile>,
}

/// Today's file, as opened.
struct OpenFile {
    path: PathBuf,
    file: File,
    /// It ended mid-line when opened: a `\n` goes before the next line, with the first write
    /// (on the log thread, whose failures are counted), not at the open, if it still does then.
    ends_mid_line: bool,
    identity: Identity,
}

impl DailyFiles {
    /// Opens today's file in `dir`, creating both as needed.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created or today's file cannot be opened (a symbolic
    /// link in its place among the reasons).
    pub(crate) fn open(dir: &Path, prefix: &str, file_mode: u32) -> io::Result<Self> {
        let mut files = DailyFiles {
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
            file_mode: file_mode & 0o777,
            open: None,
        };
        files.current()?;
        Ok(files)
    }

    /// Today's file, named as the date is now (UTC).
    fn todays_path(&self) -> PathBuf {
        let today = time::OffsetDateTime::now_utc().date();
        let (year, month, day) = (today.year(), u8::from(today.month()), today.day());
        self.dir
            .join(format!("{}.{year:04}-{month:02}-{day:02}.log", self.prefix))
    }

    /// The file to write to now: the open one while it is still today's and still at its
    /// path, else today's, opened anew.
    fn current(&mut self) -> io::Result<&mut OpenFile> {
        let path = self.todays_path();
        let still_open = self
            .open
            .as_ref()
            .is_some_and(|open| open.path == path && Identity::at(&path).ok() == Some(open.identity));
        if !still_open {
            self.open = None;
            self.open = Some(self.open_file(path)?);
        }
        // Set just above when it was not.
        self.open
            .as_mut()
            .ok_or_else(|| io::Error::other("no log file is open"))
    }

    fn open_file(&self, path: PathBuf) -> io::Result<OpenFile> {
        create_dir(&self.dir, directory_mode(self.file_mode))?;
        let created = options(self.file_mode).create_new(true).open(&path);
        let (file, existed) = match created {
            Ok(file) => {
                set_mode(&file, self.file_mode)?;
                (file, false)
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                let file = options(self.file_mode)
                    .open(&path)
                    .map_err(|error| explain(&path, error))?;
                (file, true)
            }
            Err(error) => return Err(explain(&path, error)),
        };
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file; log lines are only written to one",
                path.display()
            )));
        }
        let ends_mid_line = existed && ends_mid_line(&path);
        let identity = Identity::of(&file)?;
        Ok(OpenFile {
            path,
            file,
            ends_mid_line,
            identity,
        })
    }
}

impl Write for DailyFiles {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let open = self.current()?;
        // Asked again: another writer may have ended the line since the file was opened.
        if open.ends_mid_line && ends_mid_line(&open.path) {
            open.file.write_all(b"\n")?;
        }
        open.ends_mid_line = false;
        open.file.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.open {
            Some(open) => open.file.flush(),
            None => Ok(()),
        }
    }
}

/// Options that append, never following a symbolic link nor waiting for a FIFO's reader
/// (writes to a regular file ignore `O_NONBLOCK`), and create with `mode`.
fn options(mode: u32) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options
}

/// Whether the file at `path` ends in a line cut short (a writer killed mid-write, or stopped
/// while the disk was full): the next line must not run into it. A file that cannot be read
/// is taken as ending well.
fn ends_mid_line(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    }
    let mut last = [b'\n'];
    let Ok(mut file) = options.open(path) else { return false };
    if file.metadata().map_or(true, |metadata| metadata.len() == 0) {
        return false;
    }
    file.seek(SeekFrom::End(-1))
        .and_then(|_| file.read_exact(&mut last))
        .is_ok()
        && last[0] != b'\n'
}

/// A clearer error for a symbolic link in the file's place.
fn explain(path: &Path, error: io::Error) -> io::Error {
    #[cfg(unix)]
    if error.raw_os_error() == Some(libc::ELOOP) {
        return io::Error::new(
            error.kind(),
            format!(
                "{} is a symbolic link; log lines are never written through one",
                path.display()
            ),
        );
    }
    let _ = path;
    error
}

/// The mode of a directory for files of `file_mode`: search permission where read is granted.
fn directory_mode(file_mode: u32) -> u32 {
    file_mode | ((file_mode & 0o444) >> 2)
}

/// Creates `dir` and its missing parents, each with exactly `mode`.
fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(path) = next.filter(|path| !path.as_os_str().is_empty() && !path.exists()) {
        missing.push(path);
        next = path.parent();
    }
    for path in missing.into_iter().rev() {
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
        match builder.create(path) {
            Ok(()) => set_dir_mode(path, mode)?,
            // Created meanwhile by someone else: theirs, with their mode.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &File, _: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn set_dir_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_dir_mode(_: &Path, _: u32) -> io::Result<()> {
    Ok(())
}

/// What tells two files apart: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity(u64, u64);

impl Identity {
    #[cfg(unix)]
    fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = file.metadata()?;
        Ok(Identity(metadata.dev(), metadata.ino()))
    }

    /// The file at `path` itself, not what a symbolic link there points to.
    #[cfg(unix)]
    fn at(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(Identity(metadata.dev(), metadata.ino()))
    }

    #[cfg(not(unix))]
    fn of(_: &File) -> io::Result<Self> {
        Ok(Identity(0, 0))
    }

    #[cfg(not(unix))]
    fn at(path: &Path) -> io::Result<Self> {
        std::fs::symlink_metadata(path).map(|_| Identity(0, 0))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn directories_get_search_permission_where_files_get_read() {
        assert_eq!(directory_mode(0o640), 0o750);
        assert_eq!(directory_mode(0o600), 0o700);
        assert_eq!(directory_mode(0o644), 0o755);
    }

    #[test]
    fn created_files_and_directories_get_exactly_the_mode() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        let mut files = DailyFiles::open(&dir, "agents", 0o600).unwrap();
        files.write_all(b"{}\n").unwrap();
        let path = files.todays_path();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
    }

    #[test]
    fn a_symlink_in_place_of_todays_file_is_an_error_and_its_target_untouched() {
        let root = tempfile::tempdir().unwrap();
        let mut files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        let path = files.todays_path();
        let target = root.path().join("target.txt");
        std::fs::write(&target, "precious\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = files.write(b"line\n").unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");

        let dangling = root.path().join("nowhere.txt");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&dangling, &path).unwrap();
        assert!(files.write(b"line\n").is_err());
        assert!(!dangling.exists(), "a dangling link's target is not created");
    }

    #[test]
    fn a_line_cut_short_before_is_ended_before_the_next() {
        let root = tempfile::tempdir().unwrap();
        let files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        let path = files.todays_path();
        drop(files);
        // As a writer killed mid-line, or stopped while the disk was full, leaves it.
        std::fs::write(&path, "{\"whole\":1}\n{\"cut\":").unwrap();
        let mut files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        files.write_all(b"{\"next\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"whole\":1}\n{\"cut\":\n{\"next\":2}\n"
        );
        // A file that ends well, or is empty, is appended to as it is.
        drop(files);
        let mut files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        files.write_all(b"{\"last\":3}\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("{\"next\":2}\n{\"last\":3}\n"), "{text:?}");
        std::fs::write(&path, "").unwrap();
        drop(files);
        let mut files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        files.write_all(b"{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_todays_file_is_an_error_at_once() {
        let root = tempfile::tempdir().unwrap();
        let mut files = DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).unwrap();
        let path = files.todays_path();
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success());
        // No reader: a blocking open would wait here for ever.
        assert!(files.write(b"line\n").is_err());
        assert!(DailyFiles::open(root.path(), "agents", crate::config::DEFAULT_LOG_FILE_MODE).is_err());
        // A reader: the open succeeds, and the FIFO is refused all the same.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let error = files.write(b"line\n").unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        drop(reader);
    }
}
