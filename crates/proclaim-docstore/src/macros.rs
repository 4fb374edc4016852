//! The part of the document store that is the same on every backend, written
//! once and stamped out for each by [`doc_store_impl!`].
//!
//! The sqlx calls are identical on PostgreSQL and SQLite — only the SQL text
//! ([`Sql`](crate::sql::Sql)) and a few types differ — but code generic over
//! `sqlx::Database` needs a wall of `Encode`/`Executor` bounds, so a macro
//! expands it for each concrete backend instead.
//!
//! The invoking module defines:
//! - the store struct, with fields `outbox` (whose `pool()` gives the pool
//!   and which has `enqueue` / `enqueue_batch`) and `sql: Arc<Sql>`;
//! - the transaction struct, with fields `tx: Transaction<'static, Db>`,
//!   `outbox`, `sql: Arc<Sql>`, `poison: Option<DocStoreError>` and
//!   `raw: bool`;
//! - `async fn begin(pool) -> Result<Transaction<'static, Db>, sqlx::Error>`;
//! - `fn now()`: the write time, as the backend binds it;
//! - `fn decode(&Row) -> Result<Document, DocStoreError>`;
//! - `async fn verify_open(&mut Connection) -> Result<(), DocStoreError>`,
//!   run before committing a transaction whose raw `sqlx::Transaction` the
//!   caller used, to refuse committing one the database already aborted.

macro_rules! doc_store_impl {
    (store: $Store:ident, transaction: $Tx:ident, database: $Db:ty $(,)?) => {
        impl $Store {
            /// Reads one document, or `None` when there is none with this key.
            pub async fn get(
                &self,
                collection: &str,
                id: &str,
            ) -> Result<Option<$crate::Document>, $crate::DocStoreError> {
                $crate::error::check_key(collection, id)?;
                let row = ::sqlx::query(::sqlx::AssertSqlSafe(self.sql.get.clone()))
                    .bind(collection)
                    .bind(id)
                    .fetch_optional(self.outbox.pool())
                    .await?;
                row.as_ref().map(decode).transpose()
            }

            /// Reads one document with its body deserialized into `T`, or
            /// `None` when there is none with this key. A body that is not a
            /// `T` is a [`DocStoreError::Json`](crate::DocStoreError::Json).
            pub async fn get_as<T: ::serde::de::DeserializeOwned>(
                &self,
                collection: &str,
                id: &str,
            ) -> Result<Option<$crate::Document<T>>, $crate::DocStoreError> {
                self.get(collection, id)
                    .await?
                    .map($crate::Document::into_typed)
                    .transpose()
            }

            /// All documents of a collection, ordered by id (byte order).
            /// Reads the whole collection: meant for collections of modest
            /// size.
            pub async fn list(
                &self,
                collection: &str,
            ) -> Result<Vec<$crate::Document>, $crate::DocStoreError> {
                $crate::error::check_name("collection", collection)?;
                let rows = ::sqlx::query(::sqlx::AssertSqlSafe(self.sql.list.clone()))
                    .bind(collection)
                    .fetch_all(self.outbox.pool())
                    .await?;
                rows.iter().map(decode).collect()
            }

            /// Starts a transaction in which document writes and the events
            /// emitted in it commit together, or not at all.
            pub async fn begin(&self) -> Result<$Tx, $crate::DocStoreError> {
                let tx = begin(self.outbox.pool()).await?;
                Ok($Tx {
                    tx,
                    outbox: self.outbox.clone(),
                    sql: self.sql.clone(),
                    poison: None,
                    raw: false,
                })
            }

            /// Writes one document and `events` in one transaction of their
            /// own: both or neither. Returns the document's new version.
            /// A failed precondition is a
            /// [`DocStoreError::Conflict`](crate::DocStoreError::Conflict),
            /// and then no event is written.
            pub async fn put_with_events<B: ::serde::Serialize + ?Sized>(
                &self,
                collection: &str,
                id: &str,
                body: &B,
                expect: $crate::Expect,
                events: &[::proclaim_core::Event],
            ) -> Result<i64, $crate::DocStoreError> {
                let mut tx = self.begin().await?;
                let version = tx.put(collection, id, body, expect).await?;
                tx.emit_all(events).await?;
                tx.commit().await?;
                Ok(version)
            }

            /// Deletes one document and writes `events` in one transaction of
            /// their own: both or neither. A failed precondition is a
            /// [`DocStoreError::Conflict`](crate::DocStoreError::Conflict),
            /// and then no event is written.
            pub async fn delete_with_events(
                &self,
                collection: &str,
                id: &str,
                expect: $crate::Expect,
                events: &[::proclaim_core::Event],
            ) -> Result<(), $crate::DocStoreError> {
                let mut tx = self.begin().await?;
                tx.delete(collection, id, expect).await?;
                tx.emit_all(events).await?;
                tx.commit().await
            }
        }

        impl $Tx {
            /// Creates or replaces a document if `expect` holds, and returns
            /// its new version (1 when created).
            ///
            /// If `expect` does not hold the result is a
            /// [`DocStoreError::Conflict`](crate::DocStoreError::Conflict)
            /// with the stored version, and the transaction is poisoned:
            /// further calls return the same error and
            /// [`commit`](Self::commit) rolls back and returns it, so none of
            /// the transaction's documents or events are written.
            pub async fn put<B: ::serde::Serialize + ?Sized>(
                &mut self,
                collection: &str,
                id: &str,
                body: &B,
                expect: $crate::Expect,
            ) -> Result<i64, $crate::DocStoreError> {
                self.usable()?;
                $crate::error::check_key(collection, id)?;
                let body = ::serde_json::to_string(body)
                    .map_err(|e| $crate::DocStoreError::json(collection, id, e))?;
                let written = self.write(collection, id, &body, expect).await;
                self.note(written)
            }

            /// Deletes a document if `expect` holds. With
            /// [`Expect::Any`](crate::Expect::Any) deleting a missing
            /// document does nothing; with
            /// [`Expect::Absent`](crate::Expect::Absent) an existing document
            /// is a conflict (and a missing one nothing to do). A conflict
            /// poisons the transaction as for [`put`](Self::put).
            pub async fn delete(
                &mut self,
                collection: &str,
                id: &str,
                expect: $crate::Expect,
            ) -> Result<(), $crate::DocStoreError> {
                self.usable()?;
                $crate::error::check_key(collection, id)?;
                let removed = self.remove(collection, id, expect).await;
                self.note(removed)
            }

            /// Reads a document as this transaction sees it (its own writes
            /// included).
            pub async fn get(
                &mut self,
                collection: &str,
                id: &str,
            ) -> Result<Option<$crate::Document>, $crate::DocStoreError> {
                self.usable()?;
                $crate::error::check_key(collection, id)?;
                let row = ::sqlx::query(::sqlx::AssertSqlSafe(self.sql.get.clone()))
                    .bind(collection)
                    .bind(id)
                    .fetch_optional(&mut *self.tx)
                    .await;
                let row = self.note(row.map_err($crate::DocStoreError::from))?;
                row.as_ref().map(decode).transpose()
            }

            /// Writes `event` to the outbox in this transaction: it is
            /// published if and only if the transaction commits.
            pub async fn emit(
                &mut self,
                event: &::proclaim_core::Event,
            ) -> Result<(), $crate::DocStoreError> {
                self.usable()?;
                let done = self.outbox.enqueue(&mut self.tx, event).await;
                self.note(done.map_err($crate::DocStoreError::from))
            }

            /// Writes `events` to the outbox in this transaction, in order,
            /// with one statement.
            pub async fn emit_all(
                &mut self,
                events: &[::proclaim_core::Event],
            ) -> Result<(), $crate::DocStoreError> {
                self.usable()?;
                let done = self.outbox.enqueue_batch(&mut self.tx, events).await;
                self.note(done.map_err($crate::DocStoreError::from))
            }

            /// The underlying sqlx transaction, for your own statements in
            /// the same atomic unit. If one of them fails, do not commit:
            /// roll back (PostgreSQL has then aborted the transaction, and
            /// [`commit`](Self::commit) reports that as
            /// [`DocStoreError::Aborted`](crate::DocStoreError::Aborted)).
            pub fn transaction(&mut self) -> &mut ::sqlx::Transaction<'static, $Db> {
                self.raw = true;
                &mut self.tx
            }

            /// True once a conflict or a database error has poisoned the
            /// transaction: it can only roll back.
            pub fn is_poisoned(&self) -> bool {
                self.poison.is_some()
            }

            /// Commits the documents and events written in this transaction.
            /// A poisoned transaction is rolled back instead, and the error
            /// that poisoned it (a conflict, or
            /// [`DocStoreError::Aborted`](crate::DocStoreError::Aborted))
            /// is returned: nothing was written.
            pub async fn commit(mut self) -> Result<(), $crate::DocStoreError> {
                if let Some(err) = self.poison.take() {
                    if let Err(e) = self.tx.rollback().await {
                        // The connection is closed or broken: the database
                        // rolls the transaction back on its own.
                        ::tracing::debug!(error = %e, "rollback of a poisoned document transaction failed");
                    }
                    return Err(err);
                }
                if self.raw {
                    verify_open(&mut self.tx).await?;
                }
                self.tx.commit().await?;
                Ok(())
            }

            /// Rolls back: none of the transaction's documents or events are
            /// written. (Dropping the transaction does the same.)
            pub async fn rollback(self) -> Result<(), $crate::DocStoreError> {
                self.tx.rollback().await?;
                Ok(())
            }

            fn usable(&self) -> Result<(), $crate::DocStoreError> {
                match &self.poison {
                    Some(err) => Err(err.replay()),
                    None => Ok(()),
                }
            }

            /// Poisons the transaction on an error that touched the database.
            fn note<T>(
                &mut self,
                result: Result<T, $crate::DocStoreError>,
            ) -> Result<T, $crate::DocStoreError> {
                if let Err(err) = &result
                    && err.poisons()
                    && self.poison.is_none()
                {
                    ::tracing::debug!(table = %self.sql.table, error = %err, "document transaction poisoned");
                    self.poison = Some(err.replay());
                }
                result
            }

            async fn stored_version(
                &mut self,
                collection: &str,
                id: &str,
            ) -> Result<Option<i64>, $crate::DocStoreError> {
                Ok(
                    ::sqlx::query_scalar(::sqlx::AssertSqlSafe(self.sql.version.clone()))
                        .bind(collection)
                        .bind(id)
                        .fetch_optional(&mut *self.tx)
                        .await?,
                )
            }

            async fn write(
                &mut self,
                collection: &str,
                id: &str,
                body: &str,
                expect: $crate::Expect,
            ) -> Result<i64, $crate::DocStoreError> {
                let now = now();
                let written: Option<i64> = match expect {
                    $crate::Expect::Any => Some(
                        ::sqlx::query_scalar(::sqlx::AssertSqlSafe(self.sql.upsert.clone()))
                            .bind(collection)
                            .bind(id)
                            .bind(body)
                            .bind(now)
                            .fetch_one(&mut *self.tx)
                            .await?,
                    ),
                    $crate::Expect::Absent => {
                        ::sqlx::query_scalar(::sqlx::AssertSqlSafe(self.sql.insert.clone()))
                            .bind(collection)
                            .bind(id)
                            .bind(body)
                            .bind(now)
                            .fetch_optional(&mut *self.tx)
                            .await?
                    }
                    $crate::Expect::Version(expected) => {
                        ::sqlx::query_scalar(::sqlx::AssertSqlSafe(self.sql.update.clone()))
                            .bind(collection)
                            .bind(id)
                            .bind(body)
                            .bind(now)
                            .bind(expected)
                            .fetch_optional(&mut *self.tx)
                            .await?
                    }
                };
                match written {
                    Some(version) => Ok(version),
                    None => {
                        let actual = self.stored_version(collection, id).await?;
                        Err($crate::error::conflict(collection, id, expect, actual))
                    }
                }
            }

            async fn remove(
                &mut self,
                collection: &str,
                id: &str,
                expect: $crate::Expect,
            ) -> Result<(), $crate::DocStoreError> {
                match expect {
                    $crate::Expect::Any => {
                        ::sqlx::query(::sqlx::AssertSqlSafe(self.sql.delete_any.clone()))
                            .bind(collection)
                            .bind(id)
                            .execute(&mut *self.tx)
                            .await?;
                        Ok(())
                    }
                    $crate::Expect::Absent => match self.stored_version(collection, id).await? {
                        None => Ok(()),
                        actual => Err($crate::error::conflict(collection, id, expect, actual)),
                    },
                    $crate::Expect::Version(expected) => {
                        let deleted: Option<i64> = ::sqlx::query_scalar(::sqlx::AssertSqlSafe(
                            self.sql.delete_version.clone(),
                        ))
                        .bind(collection)
                        .bind(id)
                        .bind(expected)
                        .fetch_optional(&mut *self.tx)
                        .await?;
                        if deleted.is_some() {
                            return Ok(());
                        }
                        let actual = self.stored_version(collection, id).await?;
                        Err($crate::error::conflict(collection, id, expect, actual))
                    }
                }
            }
        }

        impl ::std::fmt::Debug for $Tx {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($Tx))
                    .field("table", &self.sql.table)
                    .field("poisoned", &self.poison.is_some())
                    .finish_non_exhaustive()
            }
        }
    };
}
