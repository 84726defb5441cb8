//! All SQL of the engine, one module per table. Statements are written once with `$N` placeholders, which both
//! PostgreSQL and SQLite (through sqlx) accept; where the dialects differ the module says so.

pub mod attachments;
pub mod contacts;
pub mod events;
pub mod instances;
pub mod mailbox_cursors;
pub mod mailbox_leases;
pub mod messages;
pub mod outbox;
pub mod quarantine;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, RuntimeErr, SqlErr,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait, Value,
};

pub use mailqueue_schema::Backend;

/// Starts a write transaction. On SQLite it is `BEGIN IMMEDIATE`, so two writers never deadlock upgrading read
/// locks (a deferred transaction fails with "database is locked" instead of waiting).
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// Makes the commit of `txn` asynchronous: it returns without waiting for the WAL flush (PostgreSQL
/// `SET LOCAL synchronous_commit = off`; SQLite: no change). Its commit is still atomic and is durable within about
/// `wal_writer_delay` (200 ms); only a crash of the database server (not of the engine) in that window loses it. For
/// writes whose loss is recovered safely — the outbox worker's outcome records, whose loss turns into the "outcome
/// unknown" path — never for writes that guard an action (a claim).
pub async fn commit_asynchronously(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    if Backend::of(txn) == Backend::Postgres {
        txn.execute_raw(Statement::from_string(
            txn.get_database_backend(),
            "SET LOCAL synchronous_commit = off",
        ))
        .await?;
    }
    Ok(())
}

/// A statement for the connection's backend.
pub fn stmt(
    db: &impl ConnectionTrait,
    sql: &str,
    values: impl IntoIterator<Item = Value>,
) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

/// Byte values (raw mail, attachment data) larger than this are written in pieces of this size: the row takes
/// the first piece and each further piece is appended with a statement of its own ([`append_bytes_sql`]). A value
/// passes through three whole copies on its way out (sea-orm's value, the driver's arguments, its send buffer), so
/// a 40 MB mail written at once would cost 120 MB; in pieces it costs 12 MB. Appending rewrites the value each time
/// (on PostgreSQL, quadratic in its number of pieces), which is why pieces are large and only large values split.
pub const VALUE_PIECE: usize = 4 * 1024 * 1024;

/// The first piece of a byte value for its row (see [`VALUE_PIECE`]), and the rest to append, if any.
pub fn first_piece(bytes: &[u8]) -> (Value, Option<&[u8]>) {
    if bytes.len() <= VALUE_PIECE {
        (Value::from(bytes.to_vec()), None)
    } else {
        let (first, rest) = bytes.split_at(VALUE_PIECE);
        (Value::from(first.to_vec()), Some(rest))
    }
}

/// `UPDATE <table> SET <column> = <column> || $1 WHERE id = $2`: appends a piece to a byte value. SQLite's `||`
/// yields text (with the bytes unchanged), so it is cast back to a BLOB there.
pub fn append_bytes_sql(db: &impl ConnectionTrait, table: &str, column: &str) -> String {
    match Backend::of(db) {
        Backend::Postgres => format!("UPDATE {table} SET {column} = {column} || $1 WHERE id = $2"),
        Backend::Sqlite => {
            format!("UPDATE {table} SET {column} = CAST({column} || $1 AS BLOB) WHERE id = $2")
        }
    }
}

/// Appends `rest` to the byte value `table.column` of row `id` in pieces of [`VALUE_PIECE`].
pub async fn append_pieces(
    db: &impl ConnectionTrait,
    table: &str,
    column: &str,
    id: i64,
    rest: &[u8],
) -> Result<(), DbErr> {
    let sql = append_bytes_sql(db, table, column);
    for piece in rest.chunks(VALUE_PIECE) {
        db.execute_raw(stmt(db, &sql, [piece.to_vec().into(), id.into()]))
            .await?;
    }
    Ok(())
}

/// The length an `IN (…)` list of `n` values is padded to (with NULLs, which match nothing): the next power of two.
/// A statement over a list thus has one of a few shapes, which every pooled connection prepares once and then
/// reuses (preparing a statement with hundreds of parameters costs far more than running it).
pub fn padded_len(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `values` padded with `pad` to [`padded_len`].
pub fn padded(values: impl ExactSizeIterator<Item = Value>, pad: Value) -> Vec<Value> {
    let n = padded_len(values.len());
    values.chain(std::iter::repeat(pad)).take(n).collect()
}

/// Splits `n` rows into chunks whose sizes are powers of two, at most `max` (a power of two), largest first: the
/// row counts of multi-row inserts, for the same reason as [`padded_len`]. `500, 256` gives 256, 128, 64, 32, 16, 4.
pub fn pow2_chunks(mut n: usize, max: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    while n > 0 {
        let size = (1 << n.ilog2()).min(max);
        sizes.push(size);
        n -= size;
    }
    sizes
}

/// Splits the rows of a multi-row insert into statements: runs of at most `max_rows` rows (a power of two) and about
/// `max_bytes` (a single larger row goes alone), each run split by [`pow2_chunks`]. Order is kept.
pub fn insert_chunks<T>(
    rows: Vec<T>,
    max_rows: usize,
    max_bytes: usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut rest = rows.into_iter().peekable();
    while rest.peek().is_some() {
        let mut run = Vec::new();
        let mut size = 0;
        while let Some(row) = rest
            .next_if(|r| run.len() < max_rows && (run.is_empty() || size + bytes(r) <= max_bytes))
        {
            size += bytes(&row);
            run.push(row);
        }
        let mut run = run.into_iter();
        for n in pow2_chunks(run.len(), max_rows) {
            out.push(run.by_ref().take(n).collect());
        }
    }
    out
}

/// `($first, …), ($first+width, …), …`: the VALUES rows of a multi-row insert of `rows` rows of `width` values.
pub fn value_rows(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|i| format!("({})", placeholders(i * width + 1, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+1, …` placeholders for an `IN (…)` list of `n` values.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a transaction that failed with `e` may succeed when run again from the start: a unique violation (a
/// concurrent writer stored the same row first), or on PostgreSQL a deadlock (40P01) or serialization failure
/// (40001).
pub fn is_retryable(e: &DbErr) -> bool {
    if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) {
        return true;
    }
    let (DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = e else {
        return false;
    };
    match &**e {
        sea_orm::sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_shapes_are_powers_of_two() {
        assert_eq!(pow2_chunks(500, 256), [256, 128, 64, 32, 16, 4]);
        assert_eq!(pow2_chunks(1, 256), [1]);
        assert_eq!(pow2_chunks(0, 256), Vec::<usize>::new());
        assert_eq!(pow2_chunks(700, 256), [256, 256, 128, 32, 16, 8, 4]);
        assert_eq!(
            (padded_len(0), padded_len(1), padded_len(5), padded_len(512)),
            (1, 1, 8, 512)
        );
        let values = padded(
            [1i64, 2, 3].into_iter().map(Value::from),
            Value::BigInt(None),
        );
        assert_eq!(values.len(), 4);
        assert_eq!(values[3], Value::BigInt(None));
        assert_eq!(value_rows(2, 3), "($1, $2, $3), ($4, $5, $6)");
    }

    #[test]
    fn insert_chunks_keep_order_and_limits() {
        let sizes = |c: &Vec<Vec<usize>>| c.iter().map(Vec::len).collect::<Vec<_>>();
        let rows: Vec<usize> = (0..300).collect();
        let chunks = insert_chunks(rows.clone(), 256, usize::MAX, |_| 1);
        assert_eq!(sizes(&chunks), [256, 32, 8, 4]);
        assert_eq!(chunks.concat(), rows);
        // By bytes: rows of 10 bytes, at most 25 bytes per statement; an oversized row goes alone.
        let chunks = insert_chunks(vec![10, 10, 10, 100, 10], 256, 25, |r| *r);
        assert_eq!(chunks, [vec![10, 10], vec![10], vec![100], vec![10]]);
    }
}
