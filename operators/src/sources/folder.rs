//! Image classification folders in cn_clip's zero-shot layout (`{dataset}/test/000/….jpg`, the
//! class names in `{dataset}/label_cn.txt`), read in torchvision `ImageFolder`'s order so that
//! image ids and labels are the indices cn_clip's `zeroshot_evaluation.py` sees:
//! - classes are the sorted names of the root's subdirectories, numbered from 0;
//! - each class's files are walked recursively (following links), directories in sorted order
//!   of their full path and files sorted by name, keeping the extensions `ImageFolder` accepts
//!   (case-insensitively);
//! - image id `k` is the `k`-th file of that order.
//!
//! The root may be a prefix in an object store (`s3://bucket/datasets/cifar-10/test`), where
//! folders are key prefixes: the classes are the common prefixes of a delimited listing (so a
//! class folder holding only a marker object `000/` counts, as an empty directory does), the
//! images the keys listed under them, put in the same order by the same rules (hidden class
//! folders left out, the same extensions, keys grouped by their "folder" and sorted), so that a
//! set uploaded as it is on disk gives the same ids, labels and bytes. Objects are fetched a
//! few at a time (`FETCH_AHEAD`), in that order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayBuilder, ArrayRef, BinaryBuilder, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

use super::{BATCH_BYTES, Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage::{self, Location, remote::Remote};
use schemars::JsonSchema;
use serde::Deserialize;

/// torchvision's `IMG_EXTENSIONS`.
const EXTENSIONS: [&str; 9] = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"];

/// The largest image file read (the record limit of the line sources).
const MAX_IMAGE_BYTES: u64 = super::MAX_RECORD_BYTES as u64;

/// Objects fetched at once from a store (in order; a run also stops at [`BATCH_BYTES`]): one
/// GET at a time would leave the source waiting a round trip per image.
const FETCH_AHEAD: usize = 16;

/// Whether `name` has one of the extensions `ImageFolder` accepts (case-insensitively).
fn is_image(name: &str) -> bool {
    let lower = name.to_lowercase();
    EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

/// One image of the set, in `ImageFolder`'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub label: usize,
}

/// The class folder names, sorted (their index is the label). Hidden folders (`.name`, as
/// `.ipynb_checkpoints` that Jupyter leaves) are not classes: torchvision would count them, and
/// sorted first they would shift every label by one (see [`hidden_folders`]). `root` may be a
/// prefix in an object store (see the module docs).
///
/// # Errors
/// When `root` is not a readable directory or prefix, or has no class folders.
pub fn classes(root: &Path) -> Result<Vec<String>> {
    if storage::is_remote(root) {
        return remote_classes(root);
    }
    let root = storage::local(root).map_err(io(root))?;
    let root = root.as_ref();
    let mut classes = Vec::new();
    for entry in storage::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(Error::Format {
            path: root.display().to_string(),
            reason: "no class folders (expected e.g. 000/, 001/, …)".into(),
        });
    }
    Ok(classes)
}

/// [`classes`] of a prefix in a store: the names of its common prefixes, hidden ones left out.
fn remote_classes(root: &Path) -> Result<Vec<String>> {
    let (folders, objects) = storage::list_remote_folders(root).map_err(io(root))?;
    let nothing = folders.is_empty() && objects == 0;
    let classes: Vec<String> = folders.into_iter().filter(|name| !name.starts_with('.')).collect();
    if classes.is_empty() {
        let reason = if nothing {
            "nothing is stored under this prefix (expected class folders, e.g. 000/, 001/, …): is the URL right?"
        } else {
            "no class folders (expected e.g. 000/, 001/, …)"
        };
        return Err(Error::Format { path: root.display().to_string(), reason: reason.into() });
    }
    Ok(classes)
}

/// The hidden folders of `root` that [`classes`] leaves out, sorted (for a note to the user).
pub fn hidden_folders(root: &Path) -> Vec<String> {
    if storage::is_remote(root) {
        let folders = storage::list_remote_folders(root).map(|(folders, _)| folders).unwrap_or_default();
        return folders.into_iter().filter(|name| name.starts_with('.')).collect();
    }
    let mut hidden: Vec<String> = storage::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    hidden.sort();
    hidden
}

/// A directory's identity (device, inode), to recognise one reached again through a link.
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = storage::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Every image of the set, in `ImageFolder`'s order (a local folder: `local_entries`; a prefix
/// in a store: its listing in the same order, see the module docs). An image in a store is named
/// by its URL.
///
/// # Errors
/// IO errors walking or listing `root`, a link loop, an interruption.
pub fn entries(root: &Path) -> Result<Vec<Entry>> {
    Ok(walk(root)?.0.into_iter().map(|image| image.entry).collect())
}

/// An image as the source reads it: its entry, its path below the root (the `path` column), and
/// in a store its key and size (from the listing).
#[derive(Debug, Clone)]
struct Image {
    entry: Entry,
    relative: String,
    object: Option<(ObjectPath, u64)>,
}

/// The images under `root` in `ImageFolder`'s order, and the store when `root` is a prefix in one.
fn walk(root: &Path) -> Result<(Vec<Image>, Option<Remote>)> {
    match storage::locate(root).map_err(io(root))? {
        Location::Local(local) => {
            let images = local_entries(&local)?
                .into_iter()
                .map(|entry| {
                    let relative =
                        entry.path.strip_prefix(&local).unwrap_or(&entry.path).to_string_lossy().into_owned();
                    Image { entry, relative, object: None }
                })
                .collect();
            Ok((images, None))
        }
        Location::Remote(remote) => {
            let classes = remote_classes(root)?;
            let listed = remote.list().map_err(io(root))?;
            let prefix = match remote.key.as_ref() {
                "" => String::new(),
                key => format!("{key}/"),
            };
            // Keys outside `prefix/` (a marker object of the root itself) are not below it.
            let below: Vec<(&str, usize)> = listed
                .iter()
                .enumerate()
                .filter_map(|(i, (key, _))| key.as_ref().strip_prefix(&prefix).map(|name| (name, i)))
                .collect();
            let names: Vec<&str> = below.iter().map(|&(name, _)| name).collect();
            let images = remote_order(&classes, &names)
                .into_iter()
                .map(|(n, label)| {
                    let (name, i) = below[n];
                    let (key, size) = &listed[i];
                    Image {
                        entry: Entry { path: PathBuf::from(format!("{}/{name}", remote.url)), label },
                        relative: name.to_string(),
                        object: Some((key.clone(), *size)),
                    }
                })
                .collect();
            Ok((images, Some(remote)))
        }
    }
}

/// The images of a prefix in a store in `ImageFolder`'s order: of `names` (the keys listed below
/// the root, relative to it), the indices of those that are images of a class, with their label.
/// A key's "folder" is what precedes its last `/`; a key that is itself a folder of others (a
/// marker object `000/sub/`, listed without its slash) is not an image. As on disk: keys directly
/// below the root are not in a class, hidden classes are not classes (not in `classes`), and a
/// class's images are ordered by folder (its whole path, as a string), then by name.
fn remote_order(classes: &[String], names: &[&str]) -> Vec<(usize, usize)> {
    use std::collections::{HashMap, HashSet};
    let folders: HashSet<&str> =
        names.iter().flat_map(|name| name.match_indices('/').map(move |(at, _)| &name[..at])).collect();
    let labels: HashMap<&str, usize> = classes.iter().enumerate().map(|(label, c)| (c.as_str(), label)).collect();
    let mut found: Vec<(usize, &str, &str, usize)> = Vec::new();
    for (index, &name) in names.iter().enumerate() {
        if folders.contains(name) {
            continue;
        }
        let Some((folder, file)) = name.rsplit_once('/') else { continue };
        let class = folder.split('/').next().unwrap_or(folder);
        if let Some(&label) = labels.get(class)
            && is_image(file)
        {
            found.push((label, folder, file, index));
        }
    }
    found.sort_unstable();
    found.into_iter().map(|(label, _, _, index)| (index, label)).collect()
}

/// Every image of a local folder, in `ImageFolder`'s order. Links are followed as `os.walk(…,
/// followlinks=True)` does, but a link back to a folder being walked (a loop, which os.walk
/// follows until paths grow too long, counting the same images again at every level) or to a
/// folder the class already reaches (links fanning out, which multiply the walk) is an error
/// naming it; SIGINT and SIGTERM stop the walk.
///
/// # Errors
/// IO errors walking `root`, a link loop, an interruption.
fn local_entries(root: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (label, class) in classes(root)?.iter().enumerate() {
        // os.walk's (root, dirs, files) triples, sorted by their root string.
        let mut walk: Vec<(String, Vec<String>)> = Vec::new();
        let top = root.join(class);
        let root_id = identity(root).map_err(io(root))?;
        let top_id = identity(&top).map_err(io(&top))?;
        // Every folder of the class, once: a second way in (links fanning out to the same
        // folders) would multiply the walk without end in sight.
        let mut visited = std::collections::HashSet::from([top_id]);
        let mut stack = vec![(top.clone(), Arc::new(vec![root_id, top_id]))];
        while let Some((dir, ancestors)) = stack.pop() {
            if let Some(signal) = crate::signals::interrupted() {
                return Err(Error::Interrupted { signal });
            }
            let mut files = Vec::new();
            for entry in storage::read_dir(&dir).map_err(io(&dir))? {
                let entry = entry.map_err(io(&dir))?;
                let path = entry.path();
                if path.is_dir() {
                    let id = identity(&path).map_err(io(&path))?;
                    if ancestors.contains(&id) {
                        return Err(Error::Format {
                            path: path.display().to_string(),
                            reason: "a symbolic link loop (it leads back to a folder that contains it): the walk \
                                     would never end; remove the link"
                                .into(),
                        });
                    }
                    if !visited.insert(id) {
                        return Err(Error::Format {
                            path: path.display().to_string(),
                            reason: "a folder this class already reaches another way (through symbolic links): its \
                                     images would count twice, and links fanning out this way multiply without \
                                     end; remove the link"
                                .into(),
                        });
                    }
                    let mut inner = ancestors.as_ref().clone();
                    inner.push(id);
                    stack.push((path, Arc::new(inner)));
                } else {
                    files.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            files.sort();
            walk.push((dir.to_string_lossy().into_owned(), files));
        }
        walk.sort();
        for (dir, files) in walk {
            for file in files {
                if is_image(&file) {
                    entries.push(Entry { path: Path::new(&dir).join(file), label });
                }
            }
        }
    }
    Ok(entries)
}

/// A zero-shot image folder (the directory or prefix holding the class folders) as a source of
/// `labeled_images` batches. The folder is walked once, when the source is opened.
pub struct ImageFolderSource {
    root: PathBuf,
    images: Vec<Image>,
    /// The store, when `root` is a prefix in one.
    remote: Option<Remote>,
}

impl ImageFolderSource {
    /// Lists the set under `root` (a local folder, or a prefix in an object store).
    ///
    /// # Errors
    /// When `root` has no class folders or cannot be walked.
    pub fn open(root: PathBuf) -> Result<Self> {
        let (images, remote) = walk(&root)?;
        Ok(ImageFolderSource { root, images, remote })
    }
}

/// Why an image of `size` bytes is not read, if it is not: empty, or past the limit.
fn refused(size: u64) -> Option<String> {
    match size {
        0 => Some("empty file".to_string()),
        size if size > MAX_IMAGE_BYTES => {
            Some(format!("a file of {size} bytes, past the limit of {MAX_IMAGE_BYTES} for an image"))
        }
        _ => None,
    }
}

/// A local image file's bytes, or why it is not read.
fn read_local(path: &Path) -> std::result::Result<Vec<u8>, String> {
    // A FIFO or a device named like an image would block or never end: not read.
    match storage::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(format!("{}, not a regular file", super::parts::kind_of(&meta))),
        Ok(meta) if meta.len() > MAX_IMAGE_BYTES => {
            Err(format!("a file of {} bytes, past the limit of {MAX_IMAGE_BYTES} for an image", meta.len()))
        }
        _ => match storage::read(path) {
            Ok(data) if data.is_empty() => Err("empty file".to_string()),
            Ok(data) => Ok(data),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// The objects of `images` (all in `remote`'s store), fetched together, in order: each one's
/// bytes, or why it is not read (refused by its listed size, or the store's error naming it).
///
/// # Errors
/// The job was interrupted (SIGINT, SIGTERM) while waiting.
fn fetch(remote: &Remote, images: &[&Image]) -> std::io::Result<Vec<std::result::Result<Vec<u8>, String>>> {
    let requests: Vec<std::result::Result<(ObjectPath, String), String>> = images
        .iter()
        .map(|image| {
            let (key, size) = image.object.clone().unwrap_or_default();
            match refused(size) {
                Some(reason) => Err(reason),
                None => Ok((key, image.entry.path.display().to_string())),
            }
        })
        .collect();
    let store = remote.store.clone();
    storage::remote::run(async move {
        let gets = requests.into_iter().map(|request| {
            let store = store.clone();
            async move {
                let (key, url) = request?;
                let got = async { store.get(&key).await?.bytes().await }.await;
                match got {
                    Ok(data) if data.is_empty() => Err("empty file".to_string()),
                    Ok(data) => Ok(Vec::from(data)),
                    Err(e) => Err(storage::remote::RemoteError::into_io(&url, e).to_string()),
                }
            }
        });
        futures_util::future::join_all(gets).await
    })
}

impl Source for ImageFolderSource {
    fn origin(&self) -> String {
        self.root.display().to_string()
    }

    fn estimated_records(&self) -> Option<u64> {
        Some(self.images.len() as u64)
    }

    fn schema(&self) -> SchemaRef {
        cnclip_schemas::labeled_images()
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let schema = self.schema();
        let (mut ids, mut images, mut labels, mut paths) =
            (Int64Builder::new(), BinaryBuilder::new(), Int64Builder::new(), StringBuilder::new());
        let mut bytes = 0;
        let mut flush = |ids: &mut Int64Builder,
                         images: &mut BinaryBuilder,
                         labels: &mut Int64Builder,
                         paths: &mut StringBuilder| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(ids.finish()),
                Arc::new(images.finish()),
                Arc::new(labels.finish()),
                Arc::new(paths.finish()),
            ];
            emit(RecordBatch::try_new(schema.clone(), columns)?)
        };
        let owned: Vec<(usize, &Image)> =
            self.images.iter().enumerate().filter(|(k, _)| ctx.shard.owns(*k as u64)).collect();
        let mut start = 0;
        while start < owned.len() {
            if let Some(signal) = crate::signals::interrupted() {
                return Err(Error::Interrupted { signal });
            }
            // A local file is read alone; objects in runs of up to FETCH_AHEAD (and BATCH_BYTES).
            let (end, read) = match &self.remote {
                None => (start + 1, vec![read_local(&owned[start].1.entry.path)]),
                Some(remote) => {
                    let (mut end, mut run_bytes) = (start, 0);
                    while end < owned.len() && end - start < FETCH_AHEAD {
                        let size = owned[end].1.object.as_ref().map_or(0, |(_, size)| *size);
                        let size = if refused(size).is_some() { 0 } else { size };
                        if end > start && run_bytes + size > BATCH_BYTES as u64 {
                            break;
                        }
                        run_bytes += size;
                        end += 1;
                    }
                    let run: Vec<&Image> = owned[start..end].iter().map(|&(_, image)| image).collect();
                    match fetch(remote, &run) {
                        Ok(read) => (end, read),
                        Err(source) => {
                            if let Some(signal) = crate::signals::interrupted() {
                                return Err(Error::Interrupted { signal });
                            }
                            return Err(Error::Io { path: self.root.display().to_string(), source });
                        }
                    }
                }
            };
            for (&(k, image), data) in owned[start..end].iter().zip(read) {
                let data = match data {
                    Ok(data) => data,
                    Err(reason) => {
                        ctx.quarantine.reject(Rejected {
                            source: self.root.display().to_string(),
                            location: image.relative.clone(),
                            id: Some(k.to_string()),
                            reason,
                        })?;
                        continue;
                    }
                };
                ids.append_value(k as i64);
                images.append_value(&data);
                labels.append_value(image.entry.label as i64);
                paths.append_value(&image.relative);
                bytes += data.len();
                if ids.len() >= ctx.batch_rows.max(1) || bytes >= BATCH_BYTES {
                    bytes = 0;
                    flush(&mut ids, &mut images, &mut labels, &mut paths)?;
                }
            }
            start = end;
        }
        if ids.len() > 0 {
            flush(&mut ids, &mut images, &mut labels, &mut paths)?;
        }
        Ok(())
    }
}

/// torchvision `ImageFolder`'s layout (cn_clip's zero-shot sets) → labeled_images, in
/// `ImageFolder`'s order.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// The root: one folder of images per class (a local folder, or a prefix in an object store:
    /// `s3://bucket/datasets/cifar-10/test`).
    pub path: PathBuf,
}

impl NodeConfig for ImageFolderConfig {
    const KIND: &'static str = "image_folder";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        // A URL (a prefix in a store, or file://) is checked when it is listed.
        let root = match storage::is_url(&self.path) {
            true => cx.resolve(&self.path),
            false => cx.dir(&self.path, "image folder")?,
        };
        Ok(Operator::Source(Box::new(ImageFolderSource::open(root).map_err(|e| vec![e.to_string()])?)))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::labeled_images())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folder_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, data) in [
            ("001/b.JPG", "x"),
            ("001/a.png", "x"),
            ("000/z.jpg", "x"),
            ("000/sub/a.jpg", "x"),
            ("000/sub-b/a.jpg", "x"),
            ("000/notes.txt", "x"),
            ("010/a.webp", "x"),
        ] {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        std::fs::write(root.join("stray.jpg"), "x").unwrap();
        let found: Vec<(String, usize)> = entries(root)
            .unwrap()
            .into_iter()
            .map(|e| (e.path.strip_prefix(root).unwrap().display().to_string(), e.label))
            .collect();
        // The same names listed from a store (sorted, as listings are, with marker objects of
        // folders, listed without their slash) are put in the same order.
        let mut listed = vec![
            "001/b.JPG",
            "001/a.png",
            "000/z.jpg",
            "000/sub/a.jpg",
            "000/sub-b/a.jpg",
            "000/notes.txt",
            "010/a.webp",
            "stray.jpg",
            "000",
            "000/sub",
            ".hidden/x.jpg",
        ];
        listed.sort_unstable();
        let classes: Vec<String> = ["000", "001", "010"].map(String::from).to_vec();
        let remote: Vec<(String, usize)> =
            remote_order(&classes, &listed).into_iter().map(|(i, label)| (listed[i].to_string(), label)).collect();
        assert_eq!(remote, found);
        // Directories sort as whole path strings: "000" < "000/sub" < "000/sub-b".
        assert_eq!(
            found,
            [
                ("000/z.jpg".to_string(), 0),
                ("000/sub/a.jpg".to_string(), 0),
                ("000/sub-b/a.jpg".to_string(), 0),
                ("001/a.png".to_string(), 1),
                ("001/b.JPG".to_string(), 1),
                ("010/a.webp".to_string(), 2),
            ]
        );
    }
}
