//! The CRI `runtime.v1.ImageService` adapter: unwrap the request, call the puller
//! or the catalog, wrap the answer. Errors become `tonic::Status` in `convert`.

pub mod convert;

use crate::catalog::Catalog;
use crate::catalog::ImageView;
use crate::fs_usage::FsUsageCache;
use crate::proto::{self, image_service_server::ImageService};
use crate::puller::{PullError, Puller};
use crate::reference::ImageQuery;
use convert::Error;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use tonic::{Request, Response, Status};

/// Images per StreamImages message: well under kubelet's 16 MiB message limit.
const STREAM_CHUNK: usize = 100;

pub struct ImageServiceImpl {
    puller: Puller,
    catalog: Arc<Catalog>,
    fs_usage: Arc<FsUsageCache>,
}

impl ImageServiceImpl {
    pub fn new(puller: Puller, catalog: Arc<Catalog>, snapshotter: String) -> Self {
        ImageServiceImpl {
            puller,
            fs_usage: FsUsageCache::new(catalog.clone(), snapshotter),
            catalog,
        }
    }

    /// ImageFsInfo's cache; [`FsUsageCache::spawn_refresher`] keeps it current.
    pub fn fs_usage(&self) -> &Arc<FsUsageCache> {
        &self.fs_usage
    }

    /// The puller (for work started outside a CRI call, such as pre-pulls).
    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    /// The pulls in flight, for the status socket.
    pub fn progress(&self) -> Arc<crate::progress::Progress> {
        self.puller.progress()
    }

    async fn list(&self, filter: Option<proto::ImageFilter>) -> Result<Vec<proto::Image>, Error> {
        let wanted = filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|name| !name.is_empty());
        let images = match wanted {
            // A filter names one image, as ImageStatus would find it.
            Some(name) => self
                .catalog
                .find(&ImageQuery::parse(&name)?)
                .await?
                .into_iter()
                .collect(),
            None => self.catalog.list().await?,
        };
        Ok(images.iter().map(|image| convert::image(image)).collect())
    }

    /// The image `name` names: an ID, a fully qualified reference, or a short name
    /// looked up under each of its registries.conf candidates in order (as CRI-O
    /// does, so kubelet finds what a short-name pull stored).
    async fn find(&self, name: &str) -> Result<Option<Arc<ImageView>>, Error> {
        let query = ImageQuery::parse(name)?;
        if let ImageQuery::Id(_) = query {
            return Ok(self.catalog.find(&query).await?);
        }
        let candidates = self
            .puller
            .stored_candidates(name)
            .map_err(|e| Error::from(Arc::new(PullError::from(e))))?;
        for reference in candidates.references {
            if let Some(view) = self.catalog.find(&ImageQuery::Ref(reference)).await? {
                return Ok(Some(view));
            }
        }
        Ok(None)
    }
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<proto::ListImagesRequest>,
    ) -> Result<Response<proto::ListImagesResponse>, Status> {
        let images = self.list(request.into_inner().filter).await?;
        Ok(Response::new(proto::ListImagesResponse { images }))
    }

    type StreamImagesStream = BoxStream<'static, Result<proto::StreamImagesResponse, Status>>;

    async fn stream_images(
        &self,
        request: Request<proto::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let images = self.list(request.into_inner().filter).await?;
        let chunks: Vec<Vec<proto::Image>> =
            images.chunks(STREAM_CHUNK).map(<[_]>::to_vec).collect();
        let stream = stream::iter(chunks).map(|images| Ok(proto::StreamImagesResponse { images }));
        Ok(Response::new(stream.boxed()))
    }

    async fn image_status(
        &self,
        request: Request<proto::ImageStatusRequest>,
    ) -> Result<Response<proto::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = convert::image_name(request.image.as_ref())?;
        let Some(view) = self.find(name).await? else {
            return Ok(Response::new(proto::ImageStatusResponse::default()));
        };
        let info = if request.verbose {
            convert::verbose_info(&view)
        } else {
            Default::default()
        };
        Ok(Response::new(proto::ImageStatusResponse {
            image: Some(convert::image(&view)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<proto::PullImageRequest>,
    ) -> Result<Response<proto::PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = convert::image_name(request.image.as_ref())?;
        let auth = convert::request_auth(request.auth);
        let pulled = self
            .puller
            .pull_name(name, auth)
            .await
            .map_err(Error::from)?;
        self.fs_usage.invalidate();
        Ok(Response::new(proto::PullImageResponse {
            image_ref: pulled.image_id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<proto::RemoveImageRequest>,
    ) -> Result<Response<proto::RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = convert::image_name(request.image.as_ref())?;
        let Some(found) = self.find(name).await? else {
            return Ok(Response::new(proto::RemoveImageResponse {}));
        };
        let query = ImageQuery::Id(found.id.clone());
        let removed = self.catalog.remove(&query).await;
        self.fs_usage.invalidate();
        if let Some(removed) = removed.map_err(Error::from)? {
            tracing::info!(image_id = %removed.id, names = ?removed.record_names, "removed image");
        }
        Ok(Response::new(proto::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<proto::ImageFsInfoRequest>,
    ) -> Result<Response<proto::ImageFsInfoResponse>, Status> {
        let sample = self.fs_usage.get().await.map_err(Error::from)?;
        let taken = sample
            .taken
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let fs = convert::filesystem_usage(&sample.usage, taken);
        // Images and container writable layers share the snapshotter's filesystem,
        // so both lists carry it (as containerd reports when they are not split).
        Ok(Response::new(proto::ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![fs],
        }))
    }
}
