//! Finding a database: the given `DATABASE_URL`, the default one, or a private PostgreSQL.
