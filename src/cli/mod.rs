//! The commands behind `switchyard`: `serve` runs the service, `demo` tours it, and
//! `bootstrap` finds (or starts) the database they all need; `archive` exports the event
//! archive.

pub mod archive;
pub mod bootstrap;
pub mod demo;
pub mod private_postgres;
pub mod serve;
pub mod shutdown;

/// The output (stdout, or a FIFO) was closed by its reader (`| head`): the command stops
/// quietly, as Unix tools do, rather than panicking in `println!` or reporting a broken pipe.
#[derive(Debug, thiserror::Error)]
#[error("the output was closed by its reader")]
pub struct OutputClosed;

/// An error writing a command's output, with a reader gone made [`OutputClosed`].
pub fn output_error(error: std::io::Error) -> anyhow::Error {
    match error.kind() {
        std::io::ErrorKind::BrokenPipe => OutputClosed.into(),
        _ => error.into(),
    }
}

/// `println!` that returns its error (see [`output_error`]) instead of panicking.
#[macro_export]
macro_rules! say {
    () => {
        $crate::say!("")
    };
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(
            &mut std::io::stdout(),
            format_args!("{}\n", format_args!($($arg)*)),
        )
        .map_err($crate::cli::output_error)
    };
}
