-- Every batch updates the balances of the accounts it touches. With full
-- pages each update writes the new row version to another page and a new
-- index entry; with room left in the page, PostgreSQL updates the row in
-- place (a HOT update: same page, no index entry), which keeps commits short
-- and their duration steady. 80% leaves room for a few versions per page.
ALTER TABLE accounts SET (fillfactor = 80);
