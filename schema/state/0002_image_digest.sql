-- The manifest digest a sandbox was last booted from, so that `up` can tell that a tag now points
-- at different content ("image digest changed") without pulling. NULL for sandboxes created
-- before this column existed: no digest comparison is made for them.
ALTER TABLE sandboxes ADD COLUMN image_digest TEXT;
