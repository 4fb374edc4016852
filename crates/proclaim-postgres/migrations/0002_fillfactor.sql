-- proclaim outbox, version 2: leave half of each heap page free, so that a
-- claim's lease update (token, expiry, attempts: no indexed column) can be a
-- HOT update on the same page instead of a new tuple plus an entry in every
-- index. Applies to pages written from now on.
ALTER TABLE "{schema}"."{table}" SET (fillfactor = 50);
