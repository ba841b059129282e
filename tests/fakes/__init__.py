"""Local fakes of outside services, served on 127.0.0.1 and speaking their real protocols."""
