//! The archive seen from the shell: `switchyard archive export` writes archived events as
//! NDJSON, a page at a time, so any range fits in bounded memory.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use time::OffsetDateTime;

use super::output_error;
use crate::store::Store;

/// Events read per page.
const PAGE: i64 = 5_000;

/// Writes every archived event received in `range` (of `sources`, or all) as one JSON object
/// per line, oldest first, to `output` (gzip when it ends in `.gz`) or stdout. Returns how many.
pub async fn export(
    store: &Store,
    range: (OffsetDateTime, OffsetDateTime),
    sources: Option<&[i32]>,
    output: Option<&Path>,
) -> anyhow::Result<u64> {
    let gzip = output.is_some_and(|path| path.extension().is_some_and(|ext| ext == "gz"));
    let plain: Box<dyn Write> = match output {
        None => Box::new(std::io::stdout().lock()),
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
    };
    let mut sink = std::io::BufWriter::new(if gzip {
        Output::Gzip(flate2::write::GzEncoder::new(
            plain,
            flate2::Compression::default(),
        ))
    } else {
        Output::Plain(plain)
    });
    let mut cursor = (i32::MIN, i64::MIN);
    let mut written = 0;
    loop {
        let page = store.archive_page(range, sources, cursor, PAGE).await?;
        for event in &page {
            sink.write_all(&event.payload).map_err(output_error)?;
            sink.write_all(b"\n").map_err(output_error)?;
        }
        written += page.len() as u64;
        match page.last() {
            Some(last) if page.len() as i64 == PAGE => cursor = (last.day, last.id),
            _ => break,
        }
    }
    let finished = match sink
        .into_inner()
        .map_err(|e| output_error(e.into_error()))?
    {
        Output::Gzip(encoder) => encoder.finish().and_then(|mut plain| plain.flush()),
        Output::Plain(mut plain) => plain.flush(),
    };
    finished.map_err(output_error)?;
    Ok(written)
}

/// Where an export goes: as it is, or through gzip (finished explicitly, so a write error at
/// the end is reported rather than lost in a drop).
enum Output {
    Plain(Box<dyn Write>),
    Gzip(flate2::write::GzEncoder<Box<dyn Write>>),
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Plain(w) => w.write(buf),
            Output::Gzip(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Plain(w) => w.flush(),
            Output::Gzip(w) => w.flush(),
        }
    }
}
