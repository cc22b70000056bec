-- Per scale, per class, the mean attention weight over the ground-truth
-- pixels of that class (JSON: [[scale, [weight or null per class]], ...]).
ALTER TABLE evaluations ADD COLUMN attn_class_means TEXT NOT NULL DEFAULT '[]';
