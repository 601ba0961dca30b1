//! The `analyze` kind: code statistics of an uploaded archive.
//!
//! Owns the whole attempt: detecting the format (tar.gz or zip, by magic bytes), extracting
//! into a private scratch directory, and counting lines per language with tokei. The
//! archive is hostile input, so extraction never writes outside the scratch directory
//! (no `..`, no absolute paths, no links or devices are ever created) and every limit is
//! enforced while bytes stream, so a zip bomb or a lying header stops at the limit.
//!
//! This is blocking code (file I/O, decompression, parsing): call it from
//! `tokio::task::spawn_blocking`, never directly from async code.

use std::cell::Cell;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::JobFailure;

/// Below this many uncompressed bytes the ratio limit does not apply: tiny archives have
/// huge ratios without being bombs (a tar pads even one small file to 10 KiB of mostly
/// zeros, which gzip shrinks to ~150 bytes).
pub const RATIO_GRACE_BYTES: u64 = 1 << 20;

/// Extraction reports progress from 0 to this percentage; counting takes the rest.
const EXTRACT_PCT: u64 = 60;
const COPY_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeLimits {
    /// Total bytes decompression may produce. For tar.gz this is the whole tar stream
    /// (headers and skipped entries included), for zip the extracted entries.
    pub max_uncompressed_bytes: u64,
    /// Entries of any type (files, directories, skipped links, ...).
    pub max_entries: u64,
    /// Uncompressed bytes per compressed byte of the archive file, checked beyond
    /// [`RATIO_GRACE_BYTES`].
    pub max_ratio: u64,
    /// Size of any single extracted file.
    pub max_file_bytes: u64,
}

impl Default for AnalyzeLimits {
    fn default() -> Self {
        AnalyzeLimits {
            max_uncompressed_bytes: 512 << 20,
            max_entries: 100_000,
            max_ratio: 200,
            max_file_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanguageStats {
    pub name: String,
    pub files: u64,
    pub lines: u64,
    pub code: u64,
    pub comments: u64,
    pub blanks: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub lines: u64,
    pub code: u64,
    pub comments: u64,
    pub blanks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyzeResult {
    /// Languages tokei recognised, most code first. Code embedded in another language
    /// (e.g. Rust blocks in Markdown) is counted with the file's language.
    pub languages: Vec<LanguageStats>,
    /// Sums over `languages`; files tokei does not recognise are not counted.
    pub totals: Totals,
    /// Entries not extracted: symlinks, hard links, devices, FIFOs, sparse files,
    /// duplicates and names the file system cannot hold.
    pub skipped_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("not a tar.gz or zip archive")]
    UnsupportedFormat,
    #[error("corrupt archive: {0}")]
    BadArchive(String),
    #[error("archive limit exceeded: {0}")]
    LimitExceeded(String),
    #[error("unsafe path in archive: {0}")]
    UnsafePath(String),
    #[error("canceled")]
    Canceled,
    /// Local I/O trouble (disk full, too many open files): worth a retry.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
}

impl AnalyzeError {
    /// Retrying cannot change the outcome: the archive itself is the problem.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, AnalyzeError::Io(_) | AnalyzeError::Canceled)
    }
}

impl From<AnalyzeError> for JobFailure {
    fn from(e: AnalyzeError) -> Self {
        match e {
            AnalyzeError::Canceled => JobFailure::Canceled,
            AnalyzeError::Io(_) => JobFailure::Retryable(e.to_string()),
            _ => JobFailure::Permanent(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    TarGz,
    Zip,
}

/// Extracts `archive` into a fresh directory under `scratch_root` (created if missing,
/// removed again before returning) and counts its code per language.
///
/// `progress` gets `(pct, message)` with pct rising from 0 to 100. Blocking: call from
/// `spawn_blocking`. `cancel` is checked between entries and between buffers.
pub fn analyze_archive(
    archive: &Path,
    scratch_root: &Path,
    limits: &AnalyzeLimits,
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(u8, String),
) -> Result<AnalyzeResult, AnalyzeError> {
    let mut file = File::open(archive).map_err(AnalyzeError::Io)?;
    let compressed = file.metadata().map_err(AnalyzeError::Io)?.len();
    let format = detect_format(&mut file)?;
    let scratch = ScratchDir::create(scratch_root)?;
    progress(0, "extracting".to_string());

    let mut ex = Extractor::new(scratch.path(), limits, compressed, cancel, progress);
    match format {
        Format::TarGz => ex.extract_tar_gz(file)?,
        Format::Zip => ex.extract_zip(file)?,
    }
    let Extractor { files, skipped, .. } = ex;
    let (languages, totals) = count_languages(&files, cancel, progress)?;
    progress(100, format!("counted {} files", totals.files));
    Ok(AnalyzeResult {
        languages,
        totals,
        skipped_entries: skipped,
    })
}

fn detect_format(file: &mut File) -> Result<Format, AnalyzeError> {
    let mut magic = Vec::with_capacity(4);
    Read::by_ref(file)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(AnalyzeError::Io)?;
    file.seek(SeekFrom::Start(0)).map_err(AnalyzeError::Io)?;
    match magic.as_slice() {
        [0x1f, 0x8b, ..] => Ok(Format::TarGz),
        // Local file header, or the end-of-central-directory record of an empty zip.
        [b'P', b'K', 3, 4] | [b'P', b'K', 5, 6] => Ok(Format::Zip),
        _ => Err(AnalyzeError::UnsupportedFormat),
    }
}

/// A private (0700) directory removed with everything in it on drop. It never contains
/// symlinks (extraction creates none), so removal cannot reach outside it.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(root: &Path) -> Result<ScratchDir, AnalyzeError> {
        fs::create_dir_all(root).map_err(AnalyzeError::Io)?;
        let mut last_err = None;
        for _ in 0..16 {
            let path = root.join(format!("analyze-{:016x}", rand::random::<u64>()));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(ScratchDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(AnalyzeError::Io(e)),
            }
        }
        Err(AnalyzeError::Io(last_err.unwrap_or_else(|| {
            io::Error::other("no free scratch directory name")
        })))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Turns an entry name into a path relative to the scratch dir. `Ok(None)` for names
/// that are only `.`; an error for anything that could escape it.
fn safe_relative(raw: &Path) -> Result<Option<PathBuf>, AnalyzeError> {
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => {
                if part.as_encoded_bytes().contains(&0) {
                    return Err(AnalyzeError::BadArchive(format!(
                        "NUL byte in entry name {raw:?}"
                    )));
                }
                rel.push(part);
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(AnalyzeError::UnsafePath(raw.display().to_string()));
            }
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Errors creating an entry that its name or the archive's layout cause (a file where a
/// directory was, a duplicate, an over-long name): the entry is skipped, not retried.
fn is_entry_conflict(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
        || matches!(
            e.raw_os_error(),
            Some(
                libc::EEXIST
                    | libc::ENOTDIR
                    | libc::EISDIR
                    | libc::ENAMETOOLONG
                    | libc::EILSEQ
                    | libc::EINVAL
            )
        )
}

/// Counts bytes read through it (compressed input, for progress).
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        Ok(n)
    }
}

/// Fails once more than `budget` bytes come out of the decompressor. Reads are capped to
/// the remaining budget (+1 to detect the overrun), so a bomb is never inflated further.
struct Budgeted<R> {
    inner: R,
    used: u64,
    budget: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.budget.saturating_sub(self.used).saturating_add(1);
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.used = self.used.saturating_add(n as u64);
        if self.used > self.budget {
            self.exceeded.set(true);
            return Err(io::Error::other("decompressed size limit reached"));
        }
        Ok(n)
    }
}

/// Shared with the tar stream's reader wrappers, which the tar crate owns.
struct TarStream {
    compressed_read: Rc<Cell<u64>>,
    exceeded: Rc<Cell<bool>>,
}

struct Extractor<'a> {
    root: &'a Path,
    limits: &'a AnalyzeLimits,
    compressed: u64,
    /// min(max_uncompressed_bytes, ratio limit); `budget_from_ratio` says which applies.
    budget: u64,
    budget_from_ratio: bool,
    cancel: &'a CancellationToken,
    progress: &'a mut dyn FnMut(u8, String),
    last_pct: u8,
    tar: Option<TarStream>,
    zip_done: (u64, u64),
    entries: u64,
    uncompressed: u64,
    files: Vec<PathBuf>,
    skipped: u64,
}

impl<'a> Extractor<'a> {
    fn new(
        root: &'a Path,
        limits: &'a AnalyzeLimits,
        compressed: u64,
        cancel: &'a CancellationToken,
        progress: &'a mut dyn FnMut(u8, String),
    ) -> Self {
        let by_ratio = compressed
            .saturating_mul(limits.max_ratio)
            .max(RATIO_GRACE_BYTES);
        Extractor {
            root,
            limits,
            compressed,
            budget: by_ratio.min(limits.max_uncompressed_bytes),
            budget_from_ratio: by_ratio < limits.max_uncompressed_bytes,
            cancel,
            progress,
            last_pct: 0,
            tar: None,
            zip_done: (0, 1),
            entries: 0,
            uncompressed: 0,
            files: Vec::new(),
            skipped: 0,
        }
    }

    fn over_budget(&self) -> AnalyzeError {
        AnalyzeError::LimitExceeded(if self.budget_from_ratio {
            format!(
                "decompresses to more than {} times its size of {} bytes",
                self.limits.max_ratio, self.compressed
            )
        } else {
            format!(
                "more than {} bytes uncompressed",
                self.limits.max_uncompressed_bytes
            )
        })
    }

    /// Classifies an error from reading the archive. OS errors are local I/O trouble;
    /// everything else (bad headers, corrupt deflate data, CRC mismatch) is the archive.
    fn read_error(&self, e: io::Error) -> AnalyzeError {
        if self.tar.as_ref().is_some_and(|t| t.exceeded.get()) {
            return self.over_budget();
        }
        if e.raw_os_error().is_some() {
            AnalyzeError::Io(e)
        } else {
            AnalyzeError::BadArchive(e.to_string())
        }
    }

    fn zip_error(&self, e: zip::result::ZipError) -> AnalyzeError {
        match e {
            zip::result::ZipError::Io(e) => self.read_error(e),
            other => AnalyzeError::BadArchive(other.to_string()),
        }
    }

    fn check_cancel(&self) -> Result<(), AnalyzeError> {
        if self.cancel.is_cancelled() {
            Err(AnalyzeError::Canceled)
        } else {
            Ok(())
        }
    }

    fn count_entry(&mut self) -> Result<(), AnalyzeError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(AnalyzeError::LimitExceeded(format!(
                "more than {} entries",
                self.limits.max_entries
            )));
        }
        Ok(())
    }

    fn tick(&mut self) {
        let (done, total) = match &self.tar {
            Some(t) => (t.compressed_read.get(), self.compressed),
            None => self.zip_done,
        };
        let pct = (EXTRACT_PCT * done / total.max(1)).min(EXTRACT_PCT) as u8;
        if pct > self.last_pct {
            self.last_pct = pct;
            (self.progress)(pct, format!("extracting: {} files", self.files.len()));
        }
    }

    fn extract_tar_gz(&mut self, file: File) -> Result<(), AnalyzeError> {
        let compressed_read = Rc::new(Cell::new(0));
        let exceeded = Rc::new(Cell::new(false));
        self.tar = Some(TarStream {
            compressed_read: Rc::clone(&compressed_read),
            exceeded: Rc::clone(&exceeded),
        });
        let input = Counted {
            inner: io::BufReader::new(file),
            count: compressed_read,
        };
        // Multi-member: parallel compressors (pigz) and concatenation produce several.
        let stream = Budgeted {
            inner: flate2::read::MultiGzDecoder::new(input),
            used: 0,
            budget: self.budget,
            exceeded,
        };
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(|e| self.read_error(e))?;
        for entry in entries {
            self.check_cancel()?;
            let mut entry = entry.map_err(|e| self.read_error(e))?;
            self.count_entry()?;
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::XGlobalHeader {
                // Archive-wide metadata (git archive writes one), not content.
                continue;
            }
            let raw = entry.path().map_err(|e| self.read_error(e))?.into_owned();
            // `./` is the archive root (`tar czf x.tgz .` writes one), not content.
            let Some(rel) = safe_relative(&raw)? else {
                continue;
            };
            match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    // The tar stream is budgeted as a whole already.
                    self.write_file(&mut entry, &rel, false)?;
                }
                tar::EntryType::Directory => self.make_dir(&rel)?,
                // Links, devices, FIFOs, and sparse files (whose holes would inflate
                // outside the stream budget).
                _ => self.skipped += 1,
            }
            self.tick();
        }
        Ok(())
    }

    fn extract_zip(&mut self, file: File) -> Result<(), AnalyzeError> {
        let mut zip =
            zip::ZipArchive::new(io::BufReader::new(file)).map_err(|e| self.zip_error(e))?;
        let count = zip.len() as u64;
        if count > self.limits.max_entries {
            return Err(AnalyzeError::LimitExceeded(format!(
                "{count} entries, more than {}",
                self.limits.max_entries
            )));
        }
        for index in 0..zip.len() {
            self.check_cancel()?;
            self.count_entry()?;
            let mut entry = zip.by_index(index).map_err(|e| self.zip_error(e))?;
            let Some(rel) = safe_relative(Path::new(entry.name()))? else {
                continue;
            };
            // Unix file type bits, when the creator recorded them; 0 means unknown.
            let file_type = entry.unix_mode().map_or(0, |m| m & libc::S_IFMT);
            if entry.is_dir() || file_type == libc::S_IFDIR {
                self.make_dir(&rel)?;
            } else if file_type == 0 || file_type == libc::S_IFREG {
                // Counted per byte read: the sizes in zip headers may lie.
                self.write_file(&mut entry, &rel, true)?;
            } else {
                self.skipped += 1;
            }
            drop(entry);
            self.zip_done = (index as u64 + 1, count);
            self.tick();
        }
        Ok(())
    }

    fn make_dir(&mut self, rel: &Path) -> Result<(), AnalyzeError> {
        match fs::create_dir_all(self.root.join(rel)) {
            Ok(()) => Ok(()),
            Err(e) if is_entry_conflict(&e) => {
                self.skipped += 1;
                Ok(())
            }
            Err(e) => Err(AnalyzeError::Io(e)),
        }
    }

    /// Streams one entry to disk, enforcing the per-file limit and (for zip) the total.
    fn write_file(
        &mut self,
        reader: &mut dyn Read,
        rel: &Path,
        count_total: bool,
    ) -> Result<(), AnalyzeError> {
        let path = self.root.join(rel);
        let created = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                // create_new: a duplicate entry never overwrites or follows anything.
                OpenOptions::new().write(true).create_new(true).open(&path)
            });
        let mut out = match created {
            Ok(f) => f,
            Err(e) if is_entry_conflict(&e) => {
                self.skipped += 1;
                return Ok(());
            }
            Err(e) => return Err(AnalyzeError::Io(e)),
        };
        let mut buf = vec![0u8; COPY_BUF];
        let mut written: u64 = 0;
        loop {
            self.check_cancel()?;
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            written += n as u64;
            if written > self.limits.max_file_bytes {
                return Err(AnalyzeError::LimitExceeded(format!(
                    "{} is larger than {} bytes",
                    rel.display(),
                    self.limits.max_file_bytes
                )));
            }
            if count_total {
                self.uncompressed += n as u64;
                if self.uncompressed > self.budget {
                    return Err(self.over_budget());
                }
            }
            out.write_all(&buf[..n]).map_err(AnalyzeError::Io)?;
            self.tick();
        }
        self.files.push(path);
        Ok(())
    }
}

fn count_languages(
    files: &[PathBuf],
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(u8, String),
) -> Result<(Vec<LanguageStats>, Totals), AnalyzeError> {
    let config = tokei::Config::default();
    let mut languages = tokei::Languages::new();
    let total = files.len() as u64;
    let mut last_pct = 0;
    for (done, path) in (1u64..).zip(files) {
        if cancel.is_cancelled() {
            return Err(AnalyzeError::Canceled);
        }
        if let Some(language) = tokei::LanguageType::from_path(path, &config) {
            let report = language
                .parse(path.clone(), &config)
                .map_err(|(e, _)| AnalyzeError::Io(e))?;
            languages.entry(language).or_default().add_report(report);
        }
        let pct = (EXTRACT_PCT + (100 - EXTRACT_PCT) * done / total) as u8;
        if pct > last_pct && pct < 100 {
            last_pct = pct;
            progress(pct, format!("counting lines: {done}/{total} files"));
        }
    }

    let mut stats: Vec<LanguageStats> = languages
        .iter()
        .map(|(kind, language)| {
            let mut s = LanguageStats {
                name: kind.name().to_string(),
                files: language.reports.len() as u64,
                lines: 0,
                code: 0,
                comments: 0,
                blanks: 0,
            };
            for report in &language.reports {
                // summarise() folds embedded languages into the file's own counts.
                let r = report.stats.summarise();
                s.code += r.code as u64;
                s.comments += r.comments as u64;
                s.blanks += r.blanks as u64;
            }
            s.lines = s.code + s.comments + s.blanks;
            s
        })
        .collect();
    stats.sort_by(|a, b| b.code.cmp(&a.code).then_with(|| a.name.cmp(&b.name)));
    let totals = stats.iter().fold(Totals::default(), |mut t, s| {
        t.files += s.files;
        t.lines += s.lines;
        t.code += s.code;
        t.comments += s.comments;
        t.blanks += s.blanks;
        t
    });
    Ok((stats, totals))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MAIN_RS: &str = "// entry point\nfn main() {\n    println!(\"hi\");\n}\n\n";
    const LIB_RS: &str = "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n";
    const APP_PY: &str = "# tool\nimport os\n\nprint(os.name)\n";
    const README_MD: &str = "# Title\n\nSome text.\n";

    fn sample() -> Vec<(&'static str, &'static [u8])> {
        vec![
            ("proj/src/main.rs", MAIN_RS.as_bytes()),
            ("proj/src/lib.rs", LIB_RS.as_bytes()),
            ("proj/tools/app.py", APP_PY.as_bytes()),
            ("proj/README.md", README_MD.as_bytes()),
            ("proj/data.bin", &[0u8, 1, 2, 3]),
        ]
    }

    fn gz(tar: Vec<u8>) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&tar).unwrap();
        enc.finish().unwrap()
    }

    fn tar_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    /// A header with the name written raw: `append_data` refuses `..` and absolute paths,
    /// which is exactly what a hostile archive contains.
    fn tar_raw(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            tar_file(&mut b, path, data);
        }
        gz(b.into_inner().unwrap())
    }

    fn zip_archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        for (path, data) in entries {
            w.start_file(*path, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn scratch(&self) -> PathBuf {
            self.dir.path().join("scratch")
        }
        fn run_with(
            &self,
            bytes: &[u8],
            limits: &AnalyzeLimits,
            cancel: &CancellationToken,
            progress: &mut dyn FnMut(u8, String),
        ) -> Result<AnalyzeResult, AnalyzeError> {
            // A name that says nothing about the format: detection must use the bytes.
            let upload = self.dir.path().join("upload.bin");
            fs::write(&upload, bytes).unwrap();
            analyze_archive(&upload, &self.scratch(), limits, cancel, progress)
        }
        fn run(&self, bytes: &[u8], limits: &AnalyzeLimits) -> Result<AnalyzeResult, AnalyzeError> {
            self.run_with(bytes, limits, &CancellationToken::new(), &mut |_, _| {})
        }
        /// The scratch dir is removed again and nothing else appeared next to it.
        fn assert_clean(&self) {
            let scratch: Vec<_> = fs::read_dir(self.scratch()).unwrap().collect();
            assert!(scratch.is_empty(), "scratch dir left behind: {scratch:?}");
            let mut names: Vec<String> = fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["scratch", "upload.bin"]);
        }
    }

    fn lang<'r>(r: &'r AnalyzeResult, name: &str) -> &'r LanguageStats {
        r.languages
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("{name} missing in {:?}", r.languages))
    }

    fn check_sample_counts(r: &AnalyzeResult) {
        let names: Vec<&str> = r.languages.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["Rust", "Python", "Markdown"], "sorted by code desc");
        let rust = lang(r, "Rust");
        assert_eq!(
            (
                rust.files,
                rust.code,
                rust.comments,
                rust.blanks,
                rust.lines
            ),
            (2, 6, 1, 1, 8)
        );
        let py = lang(r, "Python");
        assert_eq!(
            (py.files, py.code, py.comments, py.blanks, py.lines),
            (1, 2, 1, 1, 4)
        );
        let md = lang(r, "Markdown");
        assert_eq!((md.files, md.lines, md.blanks), (1, 3, 1));
        assert_eq!(
            r.totals,
            Totals {
                files: 4,
                lines: 15,
                code: 8 + md.code,
                comments: 2 + md.comments,
                blanks: 3
            }
        );
    }

    #[test]
    fn counts_a_tar_gz_and_reports_monotonic_progress() {
        let fx = Fixture::new();
        let mut seen = Vec::new();
        let r = fx
            .run_with(
                &tar_gz(&sample()),
                &AnalyzeLimits::default(),
                &CancellationToken::new(),
                &mut |pct, msg| seen.push((pct, msg)),
            )
            .unwrap();
        check_sample_counts(&r);
        assert_eq!(r.skipped_entries, 0);
        let pcts: Vec<u8> = seen.iter().map(|(p, _)| *p).collect();
        assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
        assert_eq!(pcts.first(), Some(&0));
        assert_eq!(pcts.last(), Some(&100));
        assert!(
            pcts.iter().any(|p| (61..100).contains(p)),
            "counting phase: {pcts:?}"
        );
        fx.assert_clean();
    }

    #[test]
    fn counts_a_zip() {
        let fx = Fixture::new();
        let r = fx
            .run(&zip_archive(&sample()), &AnalyzeLimits::default())
            .unwrap();
        check_sample_counts(&r);
        assert_eq!(r.skipped_entries, 0);
        fx.assert_clean();
    }

    #[test]
    fn result_round_trips_through_json() {
        let fx = Fixture::new();
        let r = fx
            .run(&zip_archive(&sample()), &AnalyzeLimits::default())
            .unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["languages"][0]["name"], "Rust");
        assert_eq!(json["totals"]["files"], 4);
        let back: AnalyzeResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn tar_path_traversal_is_refused_and_nothing_escapes() {
        let fx = Fixture::new();
        let mut b = tar::Builder::new(Vec::new());
        tar_file(&mut b, "ok/main.rs", MAIN_RS.as_bytes());
        tar_raw(&mut b, "../evil", tar::EntryType::Regular, b"pwned");
        let err = fx
            .run(&gz(b.into_inner().unwrap()), &AnalyzeLimits::default())
            .unwrap_err();
        assert!(
            matches!(err, AnalyzeError::UnsafePath(ref p) if p == "../evil"),
            "{err}"
        );
        assert!(matches!(JobFailure::from(err), JobFailure::Permanent(_)));
        assert!(!fx.dir.path().join("evil").exists());
        fx.assert_clean();
    }

    #[test]
    fn tar_absolute_path_is_refused() {
        let fx = Fixture::new();
        let target = fx.dir.path().join("abs-evil");
        let mut b = tar::Builder::new(Vec::new());
        tar_raw(
            &mut b,
            target.to_str().unwrap(),
            tar::EntryType::Regular,
            b"pwned",
        );
        let err = fx
            .run(&gz(b.into_inner().unwrap()), &AnalyzeLimits::default())
            .unwrap_err();
        assert!(matches!(err, AnalyzeError::UnsafePath(_)), "{err}");
        assert!(!target.exists());
        fx.assert_clean();
    }

    #[test]
    fn zip_traversal_and_absolute_paths_are_refused() {
        for name in ["../evil", "a/../../evil", "/tmp/warpbase-abs-evil"] {
            let fx = Fixture::new();
            let bytes = zip_archive(&[("ok.rs", LIB_RS.as_bytes()), (name, b"pwned")]);
            let err = fx.run(&bytes, &AnalyzeLimits::default()).unwrap_err();
            assert!(matches!(err, AnalyzeError::UnsafePath(_)), "{name}: {err}");
            assert!(!fx.dir.path().join("evil").exists());
            fx.assert_clean();
        }
        assert!(!Path::new("/tmp/warpbase-abs-evil").exists());
    }

    #[test]
    fn symlinks_hardlinks_and_devices_are_skipped() {
        let fx = Fixture::new();
        let mut b = tar::Builder::new(Vec::new());
        tar_file(&mut b, "src/lib.rs", LIB_RS.as_bytes());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        b.append_link(&mut link, "src/passwd.rs", "/etc/passwd")
            .unwrap();
        let mut hard = tar::Header::new_gnu();
        hard.set_entry_type(tar::EntryType::Link);
        hard.set_size(0);
        b.append_link(&mut hard, "src/hard.rs", "src/lib.rs")
            .unwrap();
        tar_raw(&mut b, "dev/null", tar::EntryType::Char, b"");
        tar_raw(&mut b, "fifo", tar::EntryType::Fifo, b"");
        // A file "through" the symlink must not land in /etc either.
        tar_file(&mut b, "src/passwd.rs/x.rs", LIB_RS.as_bytes());
        let r = fx
            .run(&gz(b.into_inner().unwrap()), &AnalyzeLimits::default())
            .unwrap();
        assert_eq!(r.skipped_entries, 4);
        assert_eq!(lang(&r, "Rust").files, 2, "lib.rs and passwd.rs/x.rs");
        fx.assert_clean();
    }

    #[test]
    fn root_and_directory_entries_are_neither_files_nor_skipped() {
        let fx = Fixture::new();
        let mut b = tar::Builder::new(Vec::new());
        tar_raw(&mut b, "./", tar::EntryType::Directory, b"");
        tar_raw(&mut b, "./src/", tar::EntryType::Directory, b"");
        tar_file(&mut b, "./src/lib.rs", LIB_RS.as_bytes());
        let r = fx
            .run(&gz(b.into_inner().unwrap()), &AnalyzeLimits::default())
            .unwrap();
        assert_eq!(r.skipped_entries, 0);
        assert_eq!(r.totals.files, 1);
        assert_eq!(lang(&r, "Rust").code, 3);
    }

    #[test]
    fn zip_symlink_is_skipped() {
        let fx = Fixture::new();
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("lib.rs", opts).unwrap();
        w.write_all(LIB_RS.as_bytes()).unwrap();
        w.add_symlink("passwd.rs", "/etc/passwd", opts).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let r = fx.run(&bytes, &AnalyzeLimits::default()).unwrap();
        assert_eq!(r.skipped_entries, 1);
        assert_eq!(lang(&r, "Rust").files, 1);
        fx.assert_clean();
    }

    #[test]
    fn duplicate_and_conflicting_entries_are_skipped() {
        let fx = Fixture::new();
        let bytes = tar_gz(&[
            ("a.rs", LIB_RS.as_bytes()),
            ("a.rs", MAIN_RS.as_bytes()),
            ("a.rs/b.rs", LIB_RS.as_bytes()),
        ]);
        let r = fx.run(&bytes, &AnalyzeLimits::default()).unwrap();
        assert_eq!(r.skipped_entries, 2);
        assert_eq!(lang(&r, "Rust").code, 3, "the first a.rs wins");
    }

    fn zeros_bomb_zip(bytes: usize) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("zeros.txt", opts).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..bytes / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn zip_bomb_is_stopped_by_max_uncompressed_bytes() {
        let fx = Fixture::new();
        let bomb = zeros_bomb_zip(50 << 20);
        assert!(bomb.len() < 200_000, "compressed to {}", bomb.len());
        let limits = AnalyzeLimits {
            max_uncompressed_bytes: 4 << 20,
            max_ratio: u64::MAX,
            ..AnalyzeLimits::default()
        };
        let err = fx.run(&bomb, &limits).unwrap_err();
        assert!(
            matches!(err, AnalyzeError::LimitExceeded(ref m) if m.contains("4194304 bytes")),
            "{err}"
        );
        fx.assert_clean();
    }

    #[test]
    fn zip_bomb_is_stopped_by_max_ratio() {
        let fx = Fixture::new();
        let bomb = zeros_bomb_zip(50 << 20);
        let limits = AnalyzeLimits {
            max_ratio: 20,
            ..AnalyzeLimits::default()
        };
        let err = fx.run(&bomb, &limits).unwrap_err();
        assert!(
            matches!(err, AnalyzeError::LimitExceeded(ref m) if m.contains("20 times")),
            "{err}"
        );
        fx.assert_clean();
    }

    #[test]
    fn tar_gz_bomb_stops_at_the_limit_not_after() {
        let fx = Fixture::new();
        // 50 MB of zeros in one tar entry, gzipped to ~50 KB.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(50 << 20);
        h.set_mode(0o644);
        b.append_data(&mut h, "zeros.txt", io::repeat(0).take(50 << 20))
            .unwrap();
        let bomb = gz(b.into_inner().unwrap());
        let limits = AnalyzeLimits {
            max_uncompressed_bytes: 2 << 20,
            ..AnalyzeLimits::default()
        };
        let err = fx.run(&bomb, &limits).unwrap_err();
        assert!(
            matches!(err, AnalyzeError::LimitExceeded(ref m) if m.contains("2097152 bytes")),
            "{err}"
        );
        fx.assert_clean();
    }

    /// An endless source that records how much was pulled out of it.
    struct Endless<'c>(&'c Cell<u64>);

    impl Read for Endless<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(0);
            self.0.set(self.0.get() + buf.len() as u64);
            Ok(buf.len())
        }
    }

    #[test]
    fn budgeted_reader_never_pulls_more_than_one_byte_past_the_budget() {
        let pulled = Cell::new(0);
        let exceeded = Rc::new(Cell::new(false));
        let mut r = Budgeted {
            inner: Endless(&pulled),
            used: 0,
            budget: 100_000,
            exceeded: Rc::clone(&exceeded),
        };
        let mut sink = Vec::new();
        let err = r.read_to_end(&mut sink).unwrap_err();
        assert!(err.to_string().contains("limit"));
        assert!(exceeded.get());
        assert!(sink.len() <= 100_000);
        assert_eq!(
            pulled.get(),
            100_001,
            "inflated one byte past the budget, no more"
        );
    }

    #[test]
    fn zip_with_lying_size_headers_is_stopped() {
        let fx = Fixture::new();
        let mut bytes = zeros_bomb_zip(5 << 20);
        // Claim 100 bytes uncompressed in the local header and the central directory.
        bytes[22..26].copy_from_slice(&100u32.to_le_bytes());
        let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        bytes[cd + 24..cd + 28].copy_from_slice(&100u32.to_le_bytes());
        let limits = AnalyzeLimits {
            max_uncompressed_bytes: 1 << 20,
            ..AnalyzeLimits::default()
        };
        let err = fx.run(&bytes, &limits).unwrap_err();
        // The sizes are not trusted: inflation is counted until the limit.
        assert!(matches!(err, AnalyzeError::LimitExceeded(_)), "{err}");
        fx.assert_clean();
    }

    #[test]
    fn per_file_and_entry_limits() {
        let fx = Fixture::new();
        let big = vec![b'x'; 10_000];
        let limits = AnalyzeLimits {
            max_file_bytes: 4096,
            ..AnalyzeLimits::default()
        };
        let err = fx
            .run(&tar_gz(&[("big.txt", big.as_slice())]), &limits)
            .unwrap_err();
        assert!(
            matches!(err, AnalyzeError::LimitExceeded(ref m) if m.contains("big.txt")),
            "{err}"
        );
        let err = fx
            .run(&zip_archive(&[("big.txt", big.as_slice())]), &limits)
            .unwrap_err();
        assert!(matches!(err, AnalyzeError::LimitExceeded(_)), "{err}");

        let few = AnalyzeLimits {
            max_entries: 3,
            ..AnalyzeLimits::default()
        };
        for bytes in [tar_gz(&sample()), zip_archive(&sample())] {
            let err = fx.run(&bytes, &few).unwrap_err();
            assert!(
                matches!(err, AnalyzeError::LimitExceeded(ref m) if m.contains("entries")),
                "{err}"
            );
        }
        fx.assert_clean();
    }

    #[test]
    fn garbage_and_truncated_archives_are_permanent_errors() {
        let fx = Fixture::new();
        let err = fx
            .run(b"this is not an archive at all", &AnalyzeLimits::default())
            .unwrap_err();
        assert!(matches!(err, AnalyzeError::UnsupportedFormat), "{err}");
        assert!(err.is_permanent());
        let err = fx.run(b"", &AnalyzeLimits::default()).unwrap_err();
        assert!(matches!(err, AnalyzeError::UnsupportedFormat), "{err}");

        // Right magic, garbage after it.
        let mut fake_gz = vec![0x1f, 0x8b, 8, 0];
        fake_gz.extend_from_slice(&[0xAB; 64]);
        let mut fake_zip = b"PK\x03\x04".to_vec();
        fake_zip.extend_from_slice(&[0xCD; 64]);
        let full = tar_gz(&sample());
        let truncated = full[..full.len() / 2].to_vec();
        let zip_full = zip_archive(&sample());
        let zip_truncated = zip_full[..zip_full.len() - 30].to_vec();
        for bytes in [fake_gz, fake_zip, truncated, zip_truncated] {
            let err = fx.run(&bytes, &AnalyzeLimits::default()).unwrap_err();
            assert!(matches!(err, AnalyzeError::BadArchive(_)), "{err}");
            assert!(matches!(JobFailure::from(err), JobFailure::Permanent(_)));
        }
        fx.assert_clean();
    }

    #[test]
    fn missing_upload_is_a_transient_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = analyze_archive(
            &dir.path().join("gone"),
            dir.path(),
            &AnalyzeLimits::default(),
            &CancellationToken::new(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, AnalyzeError::Io(_)), "{err}");
        assert!(JobFailure::from(err).is_retryable());
    }

    #[test]
    fn cancellation_stops_extraction() {
        let fx = Fixture::new();
        let many: Vec<(String, &[u8])> = (0..200)
            .map(|i| (format!("f{i}.rs"), LIB_RS.as_bytes()))
            .collect();
        let refs: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let mut calls = 0;
        // Cancel from inside the first progress report after the start.
        let err = fx
            .run_with(
                &zip_archive(&refs),
                &AnalyzeLimits::default(),
                &cancel,
                &mut |pct, _| {
                    calls += 1;
                    if pct > 0 {
                        trigger.cancel();
                    }
                },
            )
            .unwrap_err();
        assert!(matches!(err, AnalyzeError::Canceled), "{err}");
        assert_eq!(JobFailure::from(err), JobFailure::Canceled);
        assert_eq!(calls, 2, "stopped right after the cancel");
        fx.assert_clean();
    }

    #[test]
    fn safe_relative_table() {
        let ok = [
            ("a/b.rs", Some("a/b.rs")),
            ("./a/./b", Some("a/b")),
            ("./", None),
            ("a//b", Some("a/b")),
        ];
        for (raw, want) in ok {
            assert_eq!(
                safe_relative(Path::new(raw)).unwrap(),
                want.map(PathBuf::from),
                "{raw}"
            );
        }
        for raw in ["../x", "a/../../x", "a/..", "/etc/passwd", "/"] {
            assert!(
                matches!(
                    safe_relative(Path::new(raw)),
                    Err(AnalyzeError::UnsafePath(_))
                ),
                "{raw}"
            );
        }
    }
}
