//! Everything mimscope writes goes through here: whole files written atomically (a temporary
//! file in the same folder, fsync, rename), so a killed run never leaves half a checkpoint,
//! table or figure behind; and every table as CSV through the `csv` crate, so a name holding a
//! comma, quote or line break stays one field ([`write_csv`], [`CsvLog`] for the training logs
//! appended row by row), and the same crate reads them back ([`CsvTable`]).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes a line to standard output. A closed or full stdout (`mimscope ... | head -3`,
/// `> /dev/full`) loses the output, never the work: the error is dropped here, where
/// `println!` would panic and end the run before its next checkpoint.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::write_stream(&mut ::std::io::stdout(), format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// [`say!`] without the line break.
#[macro_export]
macro_rules! say_text {
    ($($arg:tt)*) => {
        $crate::output::write_stream(&mut ::std::io::stdout(), format_args!($($arg)*))
    };
}

/// Writes a line to standard error, as [`say!`] does to stdout (a closed or full stderr,
/// `2>&1 | head -3` or `2>/dev/full`, loses the line, never the work).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::output::write_stream(&mut ::std::io::stderr(), format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `args` to `stream` and flushes it, dropping any error (see [`say!`]).
pub fn write_stream(stream: &mut impl Write, args: std::fmt::Arguments) {
    let _ = stream.write_fmt(args).and_then(|()| stream.flush());
}

/// Writes `bytes` to `path` atomically: temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("creating {} (is the folder writable?)", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A table as CSV text: `header`, then one record per row, each field quoted where RFC 4180
/// needs it (a comma, quote or line break in a checkpoint or image name), records ended by
/// `\n`. Numbers are formatted by the callers, so each table keeps its own precision.
pub fn csv_text<R>(header: &[&str], rows: impl IntoIterator<Item = R>) -> Result<String>
where
    R: IntoIterator,
    R::Item: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header).context("formatting a CSV header")?;
    for row in rows {
        w.write_record(row).context("formatting a CSV row")?;
    }
    let bytes = w.into_inner().context("finishing a CSV table")?;
    String::from_utf8(bytes).context("a CSV table that is not UTF-8")
}

/// Writes a table ([`csv_text`]) to `path` atomically.
pub fn write_csv<R>(path: &Path, header: &[&str], rows: impl IntoIterator<Item = R>) -> Result<()>
where
    R: IntoIterator,
    R::Item: AsRef<[u8]>,
{
    let text = csv_text(header, rows).with_context(|| format!("writing {}", path.display()))?;
    write_atomic(path, text.as_bytes())
}

/// A CSV table read back: the header row and every record after it. Records may have any
/// number of fields (the callers say which count they expect and name the row that differs).
#[derive(Debug, Clone)]
pub struct CsvTable {
    pub header: csv::StringRecord,
    pub rows: Vec<csv::StringRecord>,
}

impl CsvTable {
    /// Parses CSV text; empty lines are skipped. An empty text has an empty header.
    pub fn parse(text: &str) -> Result<CsvTable> {
        let mut r = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(text.as_bytes());
        let header = r.headers().context("reading the CSV header")?.clone();
        let rows = r
            .records()
            .collect::<std::result::Result<Vec<_>, _>>()
            .context("reading a CSV row")?;
        Ok(CsvTable { header, rows })
    }

    /// Reads and parses the CSV file at `path`.
    pub fn read(path: &Path) -> Result<CsvTable> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The index of the column named `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
}

/// A CSV log keyed by step: appended to row by row and flushed after each row, so a killed
/// run leaves every finished row on disk (metrics.csv, fusion_weights.csv).
pub struct CsvLog {
    writer: csv::Writer<std::fs::File>,
}

impl CsvLog {
    /// Opens `path` for appending; a fresh file gets `header`. On resume (`keep_through` is
    /// the checkpoint's step), rows after it (written after the checkpoint) are dropped
    /// first, and so is a last line without its line break (cut off by a kill: its step
    /// field may itself be cut short).
    pub fn open(path: &Path, header: &[&str], keep_through: Option<u64>) -> Result<Self> {
        let kept = match keep_through {
            Some(step) => kept_rows(path, step)?,
            None => Vec::new(),
        };
        write_csv(path, header, kept.iter())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            writer: csv::Writer::from_writer(file),
        })
    }

    /// Appends one row and flushes it to the file.
    pub fn row<I>(&mut self, fields: I) -> Result<()>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.writer.write_record(fields)?;
        self.writer.flush()?;
        Ok(())
    }
}

/// The complete rows of the log at `path` whose first field is a step at most `step`
/// (none where the file is missing).
fn kept_rows(path: &Path, step: u64) -> Result<Vec<csv::StringRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let table = CsvTable::parse(complete).with_context(|| format!("parsing {}", path.display()))?;
    Ok(table
        .rows
        .into_iter()
        .filter(|r| {
            r.get(0)
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s <= step)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_commas_quotes_and_line_breaks_stay_one_field() {
        let name = "mff \"fuse\" 0,2,4\nb";
        let text = csv_text(&["checkpoint", "loss"], [[name, "0.5"], ["plain", "1.0"]]).unwrap();
        assert_eq!(
            text,
            "checkpoint,loss\n\"mff \"\"fuse\"\" 0,2,4\nb\",0.5\nplain,1.0\n"
        );
        let table = CsvTable::parse(&text).unwrap();
        assert_eq!(table.header, vec!["checkpoint", "loss"]);
        assert_eq!(&table.rows[0][0], name);
        assert_eq!(table.column("loss"), Some(1));
    }

    /// Resuming keeps the complete rows up to the checkpoint: not the later ones, not a row
    /// cut off by a kill (whose step `1` is the first digit of `12`).
    #[test]
    fn a_resumed_log_keeps_complete_rows_up_to_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log.csv");
        std::fs::write(&path, "step,x\n1,a\n2,b\n3,c\n1").unwrap();
        let mut log = CsvLog::open(&path, &["step", "x"], Some(2)).unwrap();
        log.row(["3", "d"]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "step,x\n1,a\n2,b\n3,d\n"
        );
        CsvLog::open(&path, &["step", "x"], None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "step,x\n");
    }
}
