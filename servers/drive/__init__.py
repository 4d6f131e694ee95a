"""File sync (Google Drive / Dropbox): sysdesign.drive.v1.DriveService."""
