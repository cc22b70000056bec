//! Files replaced whole: written under a temporary name of this process's
//! own beside their final name, then renamed over it, so that a reader, a
//! second process writing the same file, or a kill at any moment sees the
//! old file or the new one, never half of one (a rename within a folder is
//! atomic on POSIX file systems).

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The temporary name for `path`: hidden, this process's id, and `path`'s
/// extension kept last (the image and plotting crates pick the format from
/// it).
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    path.with_file_name(format!(".{stem}.{}.tmp{ext}", std::process::id()))
}

/// Replaces `path` with what `f` writes to the path it is given (creating
/// the folder); on an error the temporary file is removed and `path` is
/// left as it was.
pub fn write_with(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, e))?;
    }
    let tmp = temporary(path);
    if let Err(e) = f(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("renaming into", path, e)
    })
}

/// Replaces `path` with `bytes`.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_with(path, |tmp| {
        std::fs::write(tmp, bytes.as_ref()).map_err(|e| Error::io("writing", tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file is replaced, not rewritten: a second name of the old file
    /// (a hard link) keeps the old content; a failed write leaves the old
    /// file and no temporary one; the temporary name keeps the extension.
    #[test]
    fn replaces_whole_files_and_leaves_nothing_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("index.md");
        write(&p, "old").unwrap();
        std::fs::hard_link(&p, d.path().join("keep.md")).unwrap();
        write(&p, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(d.path().join("keep.md")).unwrap(), "old");
        let e = write_with(&p, |tmp| {
            std::fs::write(tmp, "half").unwrap();
            Err(Error::invalid("test", "failed on purpose"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["index.md", "keep.md"]);
        let t = temporary(Path::new("r/figures/miou.png"));
        assert_eq!(t.parent(), Some(Path::new("r/figures")));
        assert!(t.to_str().unwrap().ends_with(".tmp.png"), "{t:?}");
    }
}
