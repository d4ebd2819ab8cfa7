"""Listing sources: ImageFolder trees, class tars, manifests, webdataset, parquet, object stores."""
