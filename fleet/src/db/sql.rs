//! The one layer between the fleet database's statements and its two engines: a statement
//! is written once, with `?1`, `?2`, … placeholders and arguments as [`Value`]s, and runs on
//! a SQLite connection or inside a PostgreSQL transaction ([`Conn`]); rows come back as
//! [`Row`]s of [`Value`]s whatever the engine. Only the placeholder differs on the wire
//! (`?1` here, `$1` there: [`render`]).

use std::cell::RefCell;

use super::{DbError, Engine};

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (also a boolean: 0 or 1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes (`BLOB`, `BYTEA`).
    Bytes(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v as i64)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}
impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Value {
        Value::Bytes(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}
impl From<&Option<String>> for Value {
    fn from(v: &Option<String>) -> Value {
        v.clone().into()
    }
}

/// The arguments of a statement: `args![a, b, c]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::db::sql::Value::from($v)),*][..]
    };
}
pub(crate) use args;

/// A type a column is read as.
pub trait FromValue: Sized {
    /// The value, or None when it is not of this type.
    fn from_value(v: &Value) -> Option<Self>;
    /// What it is called in an error.
    const NAME: &'static str;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    const NAME: &'static str = "an integer";
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> Option<u64> {
        i64::from_value(v).map(|i| i.max(0) as u64)
    }
    const NAME: &'static str = "an integer";
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<bool> {
        i64::from_value(v).map(|i| i != 0)
    }
    const NAME: &'static str = "a boolean";
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
    const NAME: &'static str = "text";
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Vec<u8>> {
        match v {
            Value::Bytes(b) => Some(b.clone()),
            // SQLite keeps what it was given: bytes written as text read back as text.
            Value::Text(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    }
    const NAME: &'static str = "bytes";
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
    const NAME: &'static str = T::NAME;
}

/// One row of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self.0.get(i).unwrap_or(&Value::Null);
        T::from_value(v).ok_or_else(|| DbError::Column {
            index: i,
            want: T::NAME,
            found: format!("{v:?}").chars().take(60).collect(),
        })
    }
}

/// `sql` for `engine`: SQLite takes `?N` as written, PostgreSQL `$N`.
pub fn render(engine: Engine, sql: &str) -> std::borrow::Cow<'_, str> {
    match engine {
        Engine::Sqlite => std::borrow::Cow::Borrowed(sql),
        Engine::Postgres => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            let mut quoted = false;
            while let Some(c) = chars.next() {
                if c == '\'' {
                    quoted = !quoted;
                }
                if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
                    out.push('$');
                } else {
                    out.push(c);
                }
            }
            std::borrow::Cow::Owned(out)
        }
    }
}

/// A connection to run statements on: a SQLite connection (or transaction), or a
/// PostgreSQL transaction. Every statement of the fleet database goes through one.
pub struct Conn<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(RefCell<postgres::Transaction<'a>>),
}

impl<'a> Conn<'a> {
    pub(super) fn sqlite(c: &'a rusqlite::Connection) -> Conn<'a> {
        Conn {
            inner: Inner::Sqlite(c),
        }
    }

    pub(super) fn postgres(tx: postgres::Transaction<'a>) -> Conn<'a> {
        Conn {
            inner: Inner::Postgres(RefCell::new(tx)),
        }
    }

    /// Commits a PostgreSQL transaction (a SQLite one is its caller's to commit).
    pub(super) fn commit(self) -> Result<(), DbError> {
        match self.inner {
            Inner::Sqlite(_) => Ok(()),
            Inner::Postgres(tx) => Ok(tx.into_inner().commit()?),
        }
    }

    /// The engine behind it.
    pub fn engine(&self) -> Engine {
        match self.inner {
            Inner::Sqlite(_) => Engine::Sqlite,
            Inner::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        match &self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
            }
            Inner::Postgres(tx) => {
                let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
                    .iter()
                    .map(|a| a as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                Ok(tx
                    .borrow_mut()
                    .execute(render(Engine::Postgres, sql).as_ref(), &params)?)
            }
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        match &self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        row.push(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                            rusqlite::types::ValueRef::Real(f) => Value::Int(f as i64),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                        });
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Inner::Postgres(tx) => {
                let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
                    .iter()
                    .map(|a| a as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                let rows = tx
                    .borrow_mut()
                    .query(render(Engine::Postgres, sql).as_ref(), &params)?;
                rows.iter().map(pg_row).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt(&self, sql: &str, args: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first column of the first row of a query that returns one.
    pub fn query_value<T: FromValue>(&self, sql: &str, args: &[Value]) -> Result<T, DbError> {
        match self.query_opt(sql, args)? {
            Some(r) => r.get(0),
            None => Err(DbError::Column {
                index: 0,
                want: T::NAME,
                found: "no row".into(),
            }),
        }
    }

    /// Runs several statements without arguments (a migration).
    pub fn batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(tx) => Ok(tx.borrow_mut().batch_execute(sql)?),
        }
    }
}

fn pg_row(r: &postgres::Row) -> Result<Row, DbError> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let t = col.type_();
        let v = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *t == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *t == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(i64::from(v)))
        } else if *t == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes)
        } else {
            // TEXT, VARCHAR, NAME, …: whatever reads as a string.
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            // A parameter's type is what the statement makes of it: narrower integers and
            // booleans are the schema's literals compared with a parameter.
            Value::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
            Value::Int(i) if *ty == Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
            Value::Int(i) if *ty == Type::BOOL => (*i != 0).to_sql(ty, out),
            Value::Int(i) => i.to_sql(ty, out),
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_for_postgres_outside_quotes() {
        let sql = "SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12";
        assert_eq!(render(Engine::Sqlite, sql), sql);
        assert_eq!(
            render(Engine::Postgres, sql),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }

    #[test]
    fn values_read_back_as_their_types() {
        let row = Row(vec![
            Value::Int(3),
            Value::Null,
            Value::Text("x".into()),
            Value::Bytes(vec![1]),
        ]);
        assert_eq!(row.get::<i64>(0).expect("int"), 3);
        assert!(row.get::<bool>(0).expect("bool"));
        assert_eq!(row.get::<Option<String>>(1).expect("null"), None);
        assert_eq!(row.get::<String>(2).expect("text"), "x");
        assert_eq!(row.get::<Vec<u8>>(3).expect("bytes"), vec![1]);
        assert!(row.get::<String>(0).is_err());
    }
}
