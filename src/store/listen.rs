//! `LISTEN` on the jobs channel: how the scheduler hears of new work without polling fast.

use sqlx::postgres::PgListener;

use super::{parse_notice, Result, Store, JOBS_CHANNEL};

/// What one wait on the jobs channel brought.
pub enum JobsNotice {
    /// New work for these destinations.
    Destinations(Vec<i32>),
    /// New work for any destination, or notifications may have been lost (the connection was
    /// re-established): look at every destination.
    All,
}

/// A connection listening on [`JOBS_CHANNEL`].
pub struct JobsListener {
    listener: PgListener,
}

impl Store {
    /// A new connection that listens on [`JOBS_CHANNEL`].
    pub async fn listen_jobs(&self) -> Result<JobsListener> {
        let mut listener = PgListener::connect_with(self.pool()).await?;
        listener.listen(JOBS_CHANNEL).await?;
        Ok(JobsListener { listener })
    }
}

impl JobsListener {
    /// Waits for the next notification; an error means the connection is lost.
    pub async fn next(&mut self) -> Result<JobsNotice> {
        Ok(match self.listener.try_recv().await? {
            Some(notification) => match parse_notice(notification.payload()) {
                Some(ids) => JobsNotice::Destinations(ids),
                None => JobsNotice::All,
            },
            // Reconnected: notifications may have been lost.
            None => JobsNotice::All,
        })
    }
}
