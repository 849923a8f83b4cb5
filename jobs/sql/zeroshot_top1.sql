-- Zero-shot top-1 accuracy as SQL: each image's predicted class is the one whose ensembled text
-- embedding has the largest dot product with the image's features (the argmax of cn_clip's
-- softmax(100 · f @ classifier)); ties go to the lower class index. Tables: `images` (id,
-- label, feature) and `classes` (class, feature).
SELECT avg(CASE WHEN predicted = label THEN 1.0 ELSE 0.0 END) AS top1
FROM (
  SELECT i.id, i.label, c.class AS predicted,
         row_number() OVER (PARTITION BY i.id ORDER BY dot(i.feature, c.feature) DESC, c.class) AS r
  FROM images i CROSS JOIN classes c
) WHERE r = 1
